"""The import rules that keep the tree's shape (issue 12), read from the code itself.

Processes sit at the top (``services/``, ``trigger/``, ``worker/``), the shared
core below (``leasesched/``). The core imports none of the processes, and the
processes do not import each other: what two of them share belongs in the
core (the gRPC server kit is ``leasesched/server/``). The CLI
(``leasesched/cli/``) is the entry point that starts every process, so it is
the one part of the core allowed to import them, and nothing else in the
core imports the CLI. The cluster harness (``leasesched/testing/``) starts
processes only as commands, and is used by the tests, the load test and
``local up``, so it imports none of them. Every import counts, also one
inside a function.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PROCESSES = ("services", "trigger", "worker")


def imports_of(path: Path, root: Path = REPO) -> set[str]:
    """Every module ``path`` imports (absolute names; relative imports are resolved)."""
    found: set[str] = set()
    package = ".".join(path.relative_to(root).with_suffix("").parts[:-1])
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                found.add(".".join([*base, node.module] if node.module else base))
            elif node.module:
                found.add(node.module)
    return found


def sources(folder: str) -> list[Path]:
    return sorted(p for p in (REPO / folder).rglob("*.py") if "v1" not in p.relative_to(REPO).parts)


def forbidden_in(modules: set[str], forbidden: tuple[str, ...]) -> list[str]:
    return sorted(m for m in modules if any(m == f or m.startswith(f + ".") for f in forbidden))


def violations(files: list[Path], forbidden: tuple[str, ...]) -> list[str]:
    return [f"{path.relative_to(REPO)} imports {m}" for path in files for m in forbidden_in(imports_of(path), forbidden)]


def test_the_core_imports_no_process_and_not_the_cli() -> None:
    core = [p for p in sources("leasesched") if "cli" not in p.relative_to(REPO / "leasesched").parts]
    assert len(core) > 40
    assert violations(core, (*PROCESSES, "leasesched.cli", "tests")) == []


def test_the_harness_imports_none_of_its_users() -> None:
    harness = sources("leasesched/testing")
    assert len(harness) >= 3
    users = (*PROCESSES, "leasesched.cli", "leasesched.loadtest", "tests")
    assert violations(harness, users) == []


def test_one_way_to_start_a_cluster() -> None:
    """The load test and ``local up`` start processes and wait for them through
    the harness; neither has a cluster of its own, and the load test does not
    reach into the CLI for one."""
    assert not (REPO / "leasesched" / "loadtest" / "cluster.py").exists()
    for path in (REPO / "leasesched" / "loadtest" / "runner.py", REPO / "leasesched" / "cli" / "local_cmd.py"):
        modules = imports_of(path)
        assert "leasesched.testing" in modules, f"{path.name} does not use the harness"
        assert "grpc_health.v1" not in modules, f"{path.name} has a health wait of its own"
    assert forbidden_in(imports_of(REPO / "leasesched" / "loadtest" / "runner.py"), ("leasesched.cli",)) == []


@pytest.mark.parametrize("process", PROCESSES)
def test_a_process_imports_no_other_process(process: str) -> None:
    others = tuple(p for p in PROCESSES if p != process) + ("leasesched.cli", "tests")
    assert violations(sources(process), others) == []


def test_the_rules_see_a_violation(tmp_path: Path) -> None:
    """The checker itself: imports inside a function, and relative ones, are caught."""
    sample = tmp_path / "leasesched" / "store" / "sample.py"
    sample.parent.mkdir(parents=True)
    sample.write_text("def f():\n    from worker.handlers import Handlers\n    import services.main\n    from ..cli import main\n")
    modules = imports_of(sample, root=tmp_path)
    assert modules == {"worker.handlers", "services.main", "leasesched.cli"}
    assert forbidden_in(modules, (*PROCESSES, "leasesched.cli")) == ["leasesched.cli", "services.main", "worker.handlers"]
    assert forbidden_in({"leasesched.client", "workers"}, (*PROCESSES, "leasesched.cli")) == []
