"""The operator docs name every configuration option with its real default,
and every link and Markdown file name in the docs points at something real."""

import re
from dataclasses import fields
from pathlib import Path

from leasesched.config import Config

DOC = Path(__file__).resolve().parents[2] / "docs" / "operations.md"


def test_every_config_option_is_documented_with_its_default() -> None:
    text = DOC.read_text()
    rows = {}
    for line in text.splitlines():
        if line.startswith("| `"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            rows[cells[0].strip("`")] = cells[1]
    defaults = Config()
    for f in fields(Config):
        assert f.name in rows, f"docs/operations.md does not document {f.name}"
        if f.name == "home":
            continue  # depends on the working folder
        value = getattr(defaults, f.name)
        expected = "(empty)" if value == "" else f"`{value}`"
        assert rows[f.name] == expected, f"{f.name}: documented {rows[f.name]}, real default {expected}"


LIMITS_DOC = DOC.parent / "limits.md"


def test_every_bound_is_documented_with_its_range() -> None:
    from leasesched import limits

    text = LIMITS_DOC.read_text()
    for bound in limits.ALL_BOUNDS:
        row = f"| `{bound.field}` | {bound.describe()} |"
        assert row in text, f"docs/limits.md lacks the row {row}"


ROOT = DOC.parents[1]
LINK = re.compile(r"\]\(([^)\s]+)\)")  # [text](target)
MD_NAME = re.compile(r"(?<![\w/.-])([\w./-]+\.md)\b")  # a Markdown file named in the text, linked or not


def _docs() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def _anchors(doc: Path) -> set[str]:
    """The heading anchors GitHub makes: lower case, punctuation dropped, spaces as hyphens."""
    found = set()
    for line in doc.read_text().splitlines():
        if line.startswith("#"):
            title = line.lstrip("#").strip().lower()
            found.add(re.sub(r"[^\w\- ]", "", title).replace(" ", "-"))
    return found


def test_every_relative_link_in_the_docs_points_to_an_existing_file_and_heading() -> None:
    broken = []
    for doc in _docs():
        for target in LINK.findall(doc.read_text()):
            if re.match(r"[a-z][a-z0-9+.-]*:", target):
                continue  # http:, https:, mailto: ...
            path, _, anchor = target.partition("#")
            file = (doc.parent / path).resolve() if path else doc
            if not file.exists():
                broken.append(f"{doc.relative_to(ROOT)}: ({target}) names no file")
            elif anchor and file.suffix == ".md" and anchor not in _anchors(file):
                broken.append(f"{doc.relative_to(ROOT)}: ({target}) names no heading of {file.name}")
    assert not broken, broken


def test_every_markdown_file_the_docs_name_exists() -> None:
    """Also the names in plain text ("see DESIGN.md"), not only links: relative to
    the document or to the repository root."""
    missing = []
    for doc in _docs():
        for name in MD_NAME.findall(doc.read_text()):
            if not ((doc.parent / name).exists() or (ROOT / name).exists()):
                missing.append(f"{doc.relative_to(ROOT)} names {name}, which is not in the repository")
    assert not missing, missing
