"""The package's shape: imports only go down the pipeline, there are no cycles, and the command line
starts without torch.

The stages are the package's sub-packages, in the order of `PIPELINE` (lowest first); every module
directly in ``milora/`` is a shared piece below them all, and ``milora/__init__.py`` (the public
API) sits above them all. A module may import from its own stage and from lower ones only;
function-level (lazy) imports count too, for the stage rule and for cycles.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "milora"
PIPELINE = ("linalg", "init", "adapter", "training", "eval", "analysis", "comparison", "demos", "cli")
"""decompose -> initialise -> adapter format -> train -> evaluate -> analyse -> compare -> demos -> CLI."""
SHARED, TOP = "shared", "public API"


def stage_names() -> list[str]:
    return [SHARED, *PIPELINE, TOP]


def module_name(path: Path, package: Path) -> str:
    parts = path.relative_to(package.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def stage_of(module: str, package: Path) -> str:
    """The stage a module belongs to, derived from where it lives in the package."""
    parts = module.split(".")
    if len(parts) == 1:
        return TOP
    if not (package / parts[1]).is_dir():
        return SHARED  # a module directly in milora/
    assert parts[1] in PIPELINE, f"the package milora.{parts[1]} is in no stage: add it to PIPELINE"
    return parts[1]


def imported_modules(path: Path, package: Path) -> list[tuple[str, int]]:
    """(milora module, line) for every import of the package in a file, lazy ones included."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names if alias.name.split(".")[0] == "milora"]
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "milora":
            for alias in node.names:
                candidate = Path(*f"{node.module}.{alias.name}".split("."))
                is_module = (package.parent / candidate).with_suffix(".py").exists() or (
                    package.parent / candidate).is_dir()
                found.append((f"{node.module}.{alias.name}" if is_module else node.module, node.lineno))
    return found


def import_graph(package: Path) -> dict[str, list[tuple[str, int]]]:
    return {module_name(path, package): imported_modules(path, package) for path in sorted(package.rglob("*.py"))}


def upward_imports(package: Path) -> list[str]:
    order = stage_names()
    upward = []
    for importer, imports in import_graph(package).items():
        where = importer.replace(".", "/")
        for imported, line in imports:
            if importer != "milora" and imported == "milora":
                upward.append(f"{where}:{line} imports the package's public API; import the defining module instead")
            elif order.index(stage_of(imported, package)) > order.index(stage_of(importer, package)):
                upward.append(f"{where}:{line} ({stage_of(importer, package)}) imports {imported} "
                              f"({stage_of(imported, package)})")
    return upward


def import_cycles(package: Path) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), lazy imports included."""
    graph = {module: sorted({imported for imported, _ in imports}) for module, imports in import_graph(package).items()}
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []

    def visit(module: str) -> None:
        index[module] = low[module] = len(index)
        stack.append(module)
        on_stack.add(module)
        for imported in graph.get(module, []):
            if imported not in index:
                visit(imported)
                low[module] = min(low[module], low[imported])
            elif imported in on_stack:
                low[module] = min(low[module], index[imported])
        if low[module] == index[module]:
            component = []
            while (member := stack.pop()) != module:
                on_stack.discard(member)
                component.append(member)
            on_stack.discard(module)
            if component:
                cycles.append(sorted([module, *component]))

    for module in graph:
        if module not in index:
            visit(module)
    return cycles


def test_every_package_is_a_stage():
    packages = sorted(path.name for path in PACKAGE.iterdir() if (path / "__init__.py").is_file())
    assert packages == sorted(PIPELINE), "PIPELINE must list exactly the package's sub-packages"


def test_imports_only_go_down_the_pipeline():
    upward = upward_imports(PACKAGE)
    assert not upward, "imports going up the pipeline:\n" + "\n".join(upward)


def test_no_import_cycles():
    cycles = import_cycles(PACKAGE)
    assert not cycles, "modules importing each other in a circle:\n" + "\n".join(" <-> ".join(c) for c in cycles)


def _fake_package(root: Path, files: dict[str, str]) -> Path:
    package = root / "milora"
    for name, text in {"__init__.py": "", "io.py": "", "init/__init__.py": "", "training/__init__.py": "",
                       "training/run.py": "def train():\n    pass\n", **files}.items():
        (package / name).parent.mkdir(parents=True, exist_ok=True)
        (package / name).write_text(text)
    return package


def test_the_checks_catch_an_upward_import_and_a_cycle(tmp_path):
    """The walkers themselves, on a package built under tmp_path: an init module importing the trainer
    is reported, and so is a cycle of two lazy imports."""
    package = _fake_package(tmp_path, {
        "init/probe.py": "def f():\n    from milora.training.run import train\n",
        "init/a.py": "def f():\n    from milora.init import b\n",
        "init/b.py": "def g():\n    from milora.init.a import f\n",
    })
    assert upward_imports(package) == ["milora/init/probe:2 (init) imports milora.training.run (training)"]
    assert import_cycles(package) == [["milora.init.a", "milora.init.b"]]


@pytest.mark.parametrize("argv", [["--help"], ["init", "--help"], ["merge", "--help"], ["train", "--help"],
                                  ["train", "--list-keys"], ["eval", "--help"], ["analyze", "--help"],
                                  ["compare", "--help"], ["compare", "--list-keys"], ["demo", "--help"],
                                  ["demo-vqa", "--help"]])
def test_help_starts_without_heavy_imports(argv):
    code = ("import sys; from milora.cli import main\ntry:\n    main(sys.argv[1:])\nexcept SystemExit:\n    pass\n"
            "heavy = [m for m in ('torch', 'transformers', 'peft', 'scipy', 'numpy') if m in sys.modules]\n"
            "print('HEAVY', heavy)")
    output = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, check=True).stdout
    assert output.strip().endswith("HEAVY []"), output[-300:]


def test_public_functions_are_not_shadowed_by_subpackages():
    """``import milora.training.run`` binds the package milora.training, never milora.train: every name
    of the public API stays what README says it is, whatever was imported before."""
    import importlib

    import milora

    for module in ("milora.training.run", "milora.comparison.sweep", "milora.eval.runner", "milora.init.initialize",
                   "milora.adapter.save", "milora.analysis.adapter"):
        importlib.import_module(module)
    for name in ("train", "compare", "evaluate", "get_model", "load_model", "save_adapter", "analyze_adapter"):
        assert callable(getattr(milora, name)), name
