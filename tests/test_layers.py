"""The import rules that keep the layers one-way, read from every module's source with ``ast``.

Bottom to top: ``hqclip.repo`` and ``hqclip.shards`` (the formats; no torch, neither side) <- ``training`` and
``services`` (never each other; services never torch) <- ``hqclip.jobs`` <- ``hqclip.cli``. Beside them,
``testkit`` (what tests and benchmarks share; never pytest) <- ``tests`` and ``benchmarks`` (never a test module).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _imports(path: Path) -> list[tuple[str, list[str]]]:
    """(module, names) for each import in the file, wherever it stands (lazy imports inside functions too)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(alias.name, []) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.module, [alias.name for alias in node.names]))
    return found


def _modules(*places: str) -> list[Path]:
    """The Python files of folders and single files under the repository root."""
    paths = [ROOT / place for place in places]
    return sorted(q for p in paths for q in (p.rglob("*.py") if p.is_dir() else [p]))


def test_the_modules_exist():
    """The rules below read real files: an empty tree would pass them all."""
    for folder in ("hqclip/repo", "hqclip/jobs", "training", "services"):
        assert len(_modules(folder)) >= 3, folder


@pytest.mark.parametrize(("folders", "forbidden"), [
    (("hqclip/repo", "hqclip/shards.py"), ("training", "services", "hqclip.jobs", "hqclip.cli", "torch")),
    (("training",), ("services", "hqclip.jobs", "hqclip.cli")),
    (("services",), ("training", "hqclip.jobs", "hqclip.cli", "torch", "torchvision", "open_clip")),
    (("hqclip/jobs",), ("training", "hqclip.cli", "torch")),
    (("testkit",), ("tests", "benchmarks", "pytest")),
], ids=["format", "training", "services", "jobs", "testkit"])
def test_layers_import_only_downwards(folders, forbidden):
    bad = [f"{path.relative_to(ROOT)} imports {module}" for path in _modules(*folders) for module, _ in _imports(path)
           if any(module == f or module.startswith(f + ".") for f in forbidden)]
    assert not bad, "\n".join(bad)


FIRST_PARTY = ("hqclip", "services", "training", "testkit", "benchmarks", "hqclip_client")


def _private_uses(path: Path) -> list[str]:
    """Private names (one leading underscore) of this repository a file imports, or reaches as attributes of a
    module of this repository it imports."""
    tree = ast.parse(path.read_text(), str(path))
    bound, found = set(), []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            bound |= {alias.asname or alias.name.split(".")[0] for alias in node.names
                      if alias.name.split(".")[0] in FIRST_PARTY}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in FIRST_PARTY:
            found += [f"{node.module}.{alias.name}" for alias in node.names if alias.name.startswith("_")]
            bound |= {alias.asname or alias.name for alias in node.names}
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
            root = node.value
            while isinstance(root, ast.Attribute):
                root = root.value
            if isinstance(root, ast.Name) and root.id in bound:
                found.append(f"{ast.unparse(node)} (line {node.lineno})")
    return found


def test_benchmarks_use_no_test_module_and_no_private_function():
    """Benchmarks reuse the tests' launcher, tiny model and photos through ``testkit``, and the code they measure
    through public names only: a test module or a private function may change under them without notice."""
    benchmarks = _modules("benchmarks")
    assert len(benchmarks) >= 5
    bad = [f"{path.relative_to(ROOT)} imports {module}" for path in benchmarks for module, _ in _imports(path)
           if module in ("tests", "pytest", "conftest") or module.startswith("tests.")]
    bad += [f"{path.relative_to(ROOT)} uses {name}" for path in benchmarks for name in _private_uses(path)]
    assert not bad, "\n".join(bad)


def test_scripts_name_no_test_module():
    """Shell scripts and Makefiles call Python too (``python -c "from tests.x import ..."``), out of ast's reach: a
    module moved out of tests/ must not leave one of them failing only when CI reaches it."""
    scripts = [p for p in (*ROOT.glob("benchmarks/*.sh"), *ROOT.glob("docker/**/*"), ROOT / "Makefile",
                           *ROOT.glob(".ci/*")) if p.is_file()]
    assert any(p.name == "gpu_check.sh" for p in scripts)
    bad = [str(p.relative_to(ROOT)) for p in scripts if "from tests." in p.read_text(errors="replace")
           or "import tests" in p.read_text(errors="replace")]
    assert not bad, bad
