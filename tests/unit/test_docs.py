"""The operator docs name every configuration option with its real default."""

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
