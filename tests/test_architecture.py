"""The package's shape: imports only go down the pipeline, and the command line starts without torch.

The pipeline, lowest first: shared pieces (constants, errors, io, prompts, report, models) ->
linalg (decompose) -> init (initialise) -> persistence (persist) -> train -> eval -> analysis ->
compare -> demo / cli / the package's public API. A module may import from its own stage and
from lower ones only; function-level (lazy) imports count too.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "milora"
STAGES = [
    ("shared", ("milora.constants", "milora.errors", "milora.io", "milora.prompts", "milora.report", "milora.models",
                "milora.assemble")),
    ("decompose", ("milora.linalg",)),
    ("initialise", ("milora.init", "milora.quantization")),
    ("persist", ("milora.persistence",)),
    ("train", ("milora.training",)),
    ("evaluate", ("milora.eval",)),
    ("analyse", ("milora.analysis",)),
    ("compare", ("milora.comparison",)),
    ("top", ("milora.demo", "milora.vqa_demo", "milora.cli", "milora")),
]


def stage_of(module: str) -> int:
    """Index in STAGES of the longest matching prefix."""
    best = None
    for index, (_, prefixes) in enumerate(STAGES):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and (best is None or len(prefix) > best[1]):
                best = (index, len(prefix))
    assert best is not None, f"{module} belongs to no stage: add it to STAGES"
    return best[0]


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path) -> list[tuple[str, int]]:
    """(milora module, line) for every import of the package in a file, lazy ones included."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names if alias.name.split(".")[0] == "milora"]
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "milora":
            for alias in node.names:
                candidate = f"{node.module}.{alias.name}"
                is_module = (PACKAGE.parent / Path(*candidate.split("."))).with_suffix(".py").exists() or (
                    PACKAGE.parent / Path(*candidate.split("."))).is_dir()
                found.append((candidate if is_module else node.module, node.lineno))
    return found


def test_imports_only_go_down_the_pipeline():
    upward = []
    for path in sorted(PACKAGE.rglob("*.py")):
        importer = module_name(path)
        for imported, line in imported_modules(path):
            if importer != "milora" and imported == "milora":
                upward.append(f"{path.relative_to(PACKAGE.parent)}:{line} imports the package's public API; import the "
                              "defining module instead")
            elif stage_of(imported) > stage_of(importer):
                upward.append(f"{path.relative_to(PACKAGE.parent)}:{line} ({STAGES[stage_of(importer)][0]}) imports "
                              f"{imported} ({STAGES[stage_of(imported)][0]})")
    assert not upward, "imports going up the pipeline:\n" + "\n".join(upward)


def test_the_check_catches_an_upward_import(tmp_path):
    """The walker itself: an init module importing the trainer is reported."""
    fake = PACKAGE / "init" / "_upward_probe.py"
    fake.write_text("def f():\n    from milora.training.run import train\n")
    try:
        with pytest.raises(AssertionError,
                           match=r"_upward_probe.py:2 \(initialise\) imports milora.training.run \(train\)"):
            test_imports_only_go_down_the_pipeline()
    finally:
        fake.unlink()


@pytest.mark.parametrize("argv", [["--help"], ["init", "--help"], ["train", "--help"], ["eval", "--help"],
                                  ["analyze", "--help"], ["merge", "--help"], ["demo", "--help"],
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

    for module in ("milora.training.run", "milora.comparison.sweep", "milora.eval.runner", "milora.init.initialize"):
        importlib.import_module(module)
    for name in ("train", "compare", "evaluate", "get_model", "load_model", "save_adapter", "analyze_adapter"):
        assert callable(getattr(milora, name)), name
