"""The code stays readable in pieces: short modules, short functions, the design in the repo.

The import layers and the absence of import cycles are checked by import-linter
(``lint-imports`` in ``make test``, contracts in pyproject.toml); this file checks what it
cannot.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("schemas", "edgefed", "edge_agent", "aggregator", "simulator", "bench")
MAX_MODULE_LINES = 600
MAX_FUNCTION_LINES = 60
DOCUMENTS = ("*.py", "*.md", "*.toml", "*.conf", "*.acl", "Makefile")


def _modules() -> list[Path]:
    return sorted(path for package in PACKAGES for path in (ROOT / package).rglob("*.py"))


def _functions(path: Path) -> list[tuple[str, int, int]]:
    """(name, first line, length) of every function and method in ``path``."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    return [
        (node.name, node.lineno, (node.end_lineno or node.lineno) - node.lineno + 1)
        for node in ast.walk(tree)
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
    ]


def test_the_product_packages_are_all_found() -> None:
    found = {path.relative_to(ROOT).parts[0] for path in _modules()}
    assert found == set(PACKAGES)


def test_no_module_is_longer_than_the_limit() -> None:
    long = {
        str(path.relative_to(ROOT)): lines
        for path in _modules()
        if (lines := len(path.read_text(encoding="utf-8").splitlines())) > MAX_MODULE_LINES
    }
    assert long == {}, f"modules over {MAX_MODULE_LINES} lines: split them by job"


def test_no_function_is_longer_than_the_limit() -> None:
    long = [
        f"{path.relative_to(ROOT)}:{line} {name} ({length} lines)"
        for path in _modules()
        for name, line, length in _functions(path)
        if length > MAX_FUNCTION_LINES
    ]
    assert long == [], f"functions over {MAX_FUNCTION_LINES} lines: break them into named steps"


def test_the_length_check_sees_a_long_function(tmp_path: Path) -> None:
    body = "".join(f"    x{i} = {i}\n" for i in range(MAX_FUNCTION_LINES))
    source = tmp_path / "long.py"
    source.write_text(f"def long() -> None:\n{body}", encoding="utf-8")
    assert _functions(source) == [("long", 1, MAX_FUNCTION_LINES + 1)]


def _documents(pattern: str) -> list[Path]:
    """Files of the checkout matching ``pattern``, outside hidden folders (venvs, caches)."""
    top = [path for path in ROOT.iterdir() if not path.name.startswith(".")]
    return [
        path
        for folder in top
        for path in ([folder] if folder.is_file() else folder.rglob(pattern))
        if path.match(pattern)
    ]


@pytest.mark.parametrize("pattern", DOCUMENTS)
def test_design_references_point_into_the_repository(pattern: str) -> None:
    """Comments cite docs/architecture.md, which a reader of the code can open."""
    outside = "DESIGN" + " §"  # spelled in two parts so this file does not match itself
    stale = [
        str(path.relative_to(ROOT))
        for path in _documents(pattern)
        if outside in path.read_text(encoding="utf-8", errors="replace")
    ]
    assert stale == []


def test_every_cited_section_exists() -> None:
    architecture = (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")
    headings = {
        line.split()[1] for line in architecture.splitlines() if line.startswith(("## §", "### §"))
    }
    cited = {
        section
        for path in _modules()
        for section in re.findall(r"docs/architecture\.md (§\d+[a-z]?)", path.read_text("utf-8"))
    }
    assert cited, "no module cites docs/architecture.md"
    assert cited <= headings, (
        f"cited sections missing from docs/architecture.md: {cited - headings}"
    )
