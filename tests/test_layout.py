"""The library holds only the library (DESIGN.md, Layout): importing ``lowrank_fm`` and its core modules
imports neither the model zoo (``lowrank_fm.zoo``), nor the benchmarks (``lowrank_fm.bench``), nor h5py; no
core module names zoo/ or bench/ even in a lazy import (only the command line may); the command line runs."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import lowrank_fm

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "lowrank_fm"
SUBPACKAGES = ("zoo", "bench")


def run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)


def core_modules() -> list[str]:
    """Dotted names of every module of the package outside zoo/ and bench/."""
    names = []
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        if parts[1] in SUBPACKAGES:
            continue
        names.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return names


def loaded_after(statement: str) -> list[str]:
    code = (f"import sys; {statement}; print(' '.join(sorted(m for m in sys.modules if m == 'h5py' or "
            f"m.startswith(('lowrank_fm.zoo', 'lowrank_fm.bench', 'h5py.')))))")
    result = run(code)
    assert result.returncode == 0, result.stderr
    return result.stdout.split()


def test_import_lowrank_fm_imports_neither_zoo_nor_bench_nor_h5py():
    assert loaded_after("import lowrank_fm") == []


def test_no_core_module_imports_zoo_bench_or_h5py():
    modules = core_modules()
    assert "lowrank_fm.cli" in modules and "lowrank_fm.methods.fm" in modules and len(modules) > 30
    assert loaded_after("import " + ", ".join(modules)) == []


def imported_names(path: Path) -> set[str]:
    """Every module named by an import statement of ``path`` (top level or inside a function), resolved to
    its absolute dotted name."""
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            names.add(module)
            names.update(f"{module}.{alias.name}" for alias in node.names)
    return names


def test_core_sources_do_not_name_zoo_or_bench_even_lazily():
    """Only the command line may import zoo/ and bench/ (inside its functions); the rest of the core not at all."""
    offenders = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        relative = path.relative_to(PACKAGE)
        if relative.parts[0] in SUBPACKAGES or relative == Path("cli.py"):
            continue
        bad = sorted(name for name in imported_names(path)
                     if name.startswith(("lowrank_fm.zoo", "lowrank_fm.bench")))
        if bad:
            offenders[str(relative)] = bad
    assert offenders == {}


def test_the_import_resolution_of_this_test_sees_relative_imports():
    """The check above can fail: the command line's lazy imports of zoo/ are found by it."""
    names = imported_names(PACKAGE / "cli.py")
    assert "lowrank_fm.zoo.models" in names and "lowrank_fm.bench.plots" in names
    assert "lowrank_fm.zoo.networks" in imported_names(PACKAGE / "zoo" / "models.py")


def test_command_line_help_exits_0():
    result = subprocess.run([sys.executable, "-m", "lowrank_fm.cli", "--help"], capture_output=True, text=True,
                            cwd=ROOT, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "--energy" in result.stdout and "vgg-fmnist" in result.stdout


def test_console_entry_point_and_one_version_source():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert project["project"]["scripts"] == {"lowrank-fm": "lowrank_fm.cli:main"}
    assert "version" not in project["project"] and "version" in project["project"]["dynamic"]
    assert project["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "lowrank_fm.__version__"}
    assert isinstance(lowrank_fm.__version__, str) and lowrank_fm.__version__.count(".") == 2
    data = project["tool"]["setuptools"]["package-data"]["lowrank_fm.zoo"]
    assert "checkpoints/*.pt" in data and "embedded/*" in data
    assert {"lowrank_fm.zoo", "lowrank_fm.bench"} <= set(project["tool"]["setuptools"]["packages"])
