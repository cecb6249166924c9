"""The module layers of docs/ARCHITECTURE.md, kept: a package imports only from the layers below it (and `compose`,
the composition roots, and `cli` from anything). A new upward or sideways import fails here, naming the file."""

from __future__ import annotations

import ast
from pathlib import Path

import ragtide

ROOT = Path(ragtide.__file__).parent
BELOW = {
    "contracts": set(),
    "ingest": {"contracts"},
    "generator": {"contracts"},
    "embedder": {"contracts", "ingest"},
    "stack": {"contracts", "ingest", "generator"},
    "gateway": {"contracts"},
    "bench": {"contracts", "ingest", "generator", "embedder", "stack", "gateway"},
    "retriever": {"contracts", "ingest", "generator", "embedder", "gateway"},
}


def imported_packages(path: Path, root: Path = ROOT) -> set[str]:
    """The ragtide packages a module imports (under TYPE_CHECKING too: a type is a dependency); a relative import
    is resolved from the module's own package."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        names = []
        if isinstance(node, ast.ImportFrom) and node.level > 0:
            package = ["ragtide", *path.relative_to(root).parent.parts]
            base = package[: len(package) - (node.level - 1)]
            module = ".".join(base + ([node.module] if node.module else []))
            names = [module] + ([f"{module}.{a.name}" for a in node.names] if module == "ragtide" else [])
        elif isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module] + ([f"ragtide.{a.name}" for a in node.names] if node.module == "ragtide" else [])
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        found |= {n.split(".")[1] for n in names if n.startswith("ragtide.")}
    return found


def test_each_package_imports_only_from_the_layers_below_it() -> None:
    packages = {p.name for p in ROOT.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    assert packages - set(BELOW) == {"cli"}, "a new package needs its row in docs/ARCHITECTURE.md and here"
    wrong = []
    for package, allowed in BELOW.items():
        files = sorted((ROOT / package).rglob("*.py"))
        assert files, package
        for path in files:
            for other in imported_packages(path) - allowed - {package}:
                wrong.append(f"{path.relative_to(ROOT)} imports ragtide.{other}")
    assert not wrong, wrong


def test_the_check_sees_an_upward_import(tmp_path: Path) -> None:
    module = tmp_path / "ingest" / "m.py"
    module.parent.mkdir()
    module.write_text("from ragtide.stack import templates\nimport ragtide.compose\nfrom ragtide import cli\n")
    assert imported_packages(module, tmp_path) == {"stack", "compose", "cli"}
    module.write_text("from ..retriever import app\nfrom . import sources\nfrom .. import bench\n")
    assert imported_packages(module, tmp_path) == {"retriever", "ingest", "bench"}
