"""The docs' Architecture examples are real (docs/architecture.md): the example evaluation task runs through `evaluate`,
and a Trainer option reaches `TrainingArguments` without code (``trainer_args``) or by name."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from milora.errors import ConfigError, DataError

from conftest import make_model_dir

ROOT = Path(__file__).resolve().parents[1]
ARCHITECTURE = ROOT / "docs" / "architecture.md"
README = ROOT / "README.md"


def readme_block(after: str) -> str:
    """The first ```python block after the line starting with ``after`` on the architecture page."""
    text = ARCHITECTURE.read_text()
    start = text.index(after)
    match = re.search(r"```python\n(.*?)```", text[start:], flags=re.S)
    return match.group(1)


def test_the_example_evaluation_task_runs(tmp_path, monkeypatch):
    from milora.eval import evaluate, options, registry
    from milora.models import load_base_model

    code = readme_block("**Adding an evaluation task**")
    catalogue = readme_block("**The task's options**")
    assert '"yesno": ("max_new_tokens",)' in catalogue and '"yesno": 4' in catalogue
    monkeypatch.setitem(options.TASK_OPTIONS, "yesno", ("max_new_tokens",))  # the catalogue lines of the page
    monkeypatch.setitem(options.OPTIONS["max_new_tokens"].default, "yesno", 4)
    try:
        exec(compile(code, "docs/architecture.md", "exec"), {})  # registers "yesno"
        data = tmp_path / "yesno.json"
        data.write_text(json.dumps([{"question": f"Is {n} even?", "answer": "yes" if n % 2 == 0 else "no"}
                                    for n in range(6)]))
        model, tokenizer = load_base_model(str(make_model_dir(tmp_path / "model")))
        result = evaluate(model, tokenizer, "yesno", str(data), batch_size=3, progress=False)
        assert result["summary"]["n"] == 6 and 0 <= result["summary"]["average"] <= 1
        assert {"prompt", "output", "prediction", "gold", "correct"} <= set(result["items"][0])
        with pytest.raises(DataError, match="does not take the option"):
            evaluate(model, tokenizer, "yesno", str(data), scorer="loglik")
        with pytest.raises(DataError, match="max_new_tokens must be an integer of at least 1"):
            evaluate(model, tokenizer, "yesno", str(data), max_new_tokens=0)
    finally:
        registry._TASKS.pop("yesno", None)


def test_trainer_options_pass_through(tmp_path):
    from milora.training.config import from_dict
    from milora.training.objectives import objective_for
    from milora.training.run import _training_arguments

    data = tmp_path / "d.json"
    data.write_text(json.dumps([{"instruction": "a", "output": "b"}]))
    config = from_dict({"dataset": str(data), "output_dir": str(tmp_path / "o"), "weight_decay": 0.1,
                        "trainer_args": {"adam_beta2": 0.95}})
    arguments = _training_arguments(config, False, objective_for(config, preprocessor=None))
    assert arguments.adam_beta2 == 0.95 and arguments.weight_decay == 0.1
    with pytest.raises(ConfigError, match=r"unknown key 'trainer_args.adam_beta3': did you mean 'adam_beta2'"):
        from_dict({"dataset": str(data), "output_dir": str(tmp_path / "o"), "trainer_args": {"adam_beta3": 0.9}})
    with pytest.raises(ConfigError, match=r"trainer_args\.learning_rate: milora sets this"):
        from_dict({"dataset": str(data), "output_dir": str(tmp_path / "o"), "trainer_args": {"learning_rate": 0.1}})
    assert "adam_beta2: Float = Key(" in readme_block("**Adding a training key**")


def test_readme_is_the_front_door():
    """README: the two set-up commands first, at most ~200 lines, and every docs link resolves."""
    text = README.read_text()
    assert "    make demo " in text.splitlines()[2] and "    make test " in text.splitlines()[3]
    assert len(text.splitlines()) <= 200
    links = re.findall(r"\]\((docs/[^)#]+)", text)
    assert links and all((ROOT / link).exists() for link in links), links


def architecture_tree() -> set[str]:
    """The module paths (relative to milora/) in the page's ``milora/`` tree, from its indentation."""
    block = ARCHITECTURE.read_text().split("```\nmilora/\n", 1)[1].split("```", 1)[0]
    stack, paths = [], set()
    for line in block.splitlines():
        depth = (len(line) - len(line.lstrip())) // 2 - 1
        name = line.split()[0]
        stack[depth:] = [name]
        if name.endswith(".py"):
            paths.add("".join(stack))
    return paths


def test_every_module_is_named_on_the_architecture_page():
    """The docs/architecture.md tree lists exactly the modules under milora/ (no missing, no stale)."""
    package = ROOT / "milora"
    modules = {str(path.relative_to(package)) for path in package.rglob("*.py") if path.name != "__init__.py"}
    listed = architecture_tree()
    assert not modules - listed, f"modules missing from docs/architecture.md: {sorted(modules - listed)}"
    assert not listed - modules, f"docs/architecture.md names modules that do not exist: {sorted(listed - modules)}"


@pytest.mark.slow
def test_the_readme_api_example_runs(tmp_path, monkeypatch):
    """README's ten-line API example, as written, on the embedded SmolLM2 (writes out/ under tmp_path)."""
    text = README.read_text()
    code = re.search(r"## Python API\n\n```python\n(.*?)```", text, flags=re.S).group(1)
    assert len([line for line in code.splitlines() if line.strip()]) <= 11
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    assert (tmp_path / "out" / "adapter" / "adapter_model.safetensors").exists()
    assert type(namespace["reloaded"]).__name__ == "PeftModelForCausalLM"
