"""Remote code: a model directory's own Python (``auto_map``) is never run, nor asked about."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys

import pytest

from milora.errors import ModelError
from milora.models import load_pretrained_model, load_tokenizer


@pytest.fixture
def remote_code_dir(tmp_path):
    model = tmp_path / "remote"
    model.mkdir()
    marker = tmp_path / "ran"
    (model / "config.json").write_text(json.dumps({
        "model_type": "milora_unknown_type",
        "auto_map": {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel",
                     "AutoTokenizer": ["evil.EvilTokenizer", None]},
    }))
    (model / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    return model, marker


def test_remote_code_is_refused_not_run(remote_code_dir):
    model, marker = remote_code_dir
    with pytest.raises(ModelError, match="never runs a model's code"):
        load_pretrained_model(str(model))
    with pytest.raises(ModelError):
        load_tokenizer(str(model))
    assert not marker.exists()


def test_cli_init_on_remote_code_never_prompts(remote_code_dir, tmp_path):
    model, marker = remote_code_dir
    result = subprocess.run([sys.executable, "-m", "milora.cli", "init", str(model), "--output", str(tmp_path / "o")],
                            input="y\n", capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert "never runs a model's code" in result.stderr
    assert "[y/N]" not in result.stdout + result.stderr
    assert not marker.exists()


class Exploit:
    """Unpickling it runs a shell command that creates ``marker``."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_pickled_adapter_is_refused_never_unpickled(tmp_path):
    """docs/reliability.md: "a pickled adapter_model.bin is refused": a milora adapter and a plain PEFT adapter
    whose weights are only a pickle (one that runs a command when unpickled): load_model, eval and merge
    refuse them, naming the missing safetensors file, and nothing is unpickled or written."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    import milora
    from milora.errors import AdapterError

    from conftest import cli_error, make_model_dir

    marker, model_dir = tmp_path / "unpickled", make_model_dir(tmp_path / "model")

    def base():
        return AutoModelForCausalLM.from_pretrained(model_dir)

    lora = LoraConfig(r=4, target_modules=["q_proj", "v_proj"])
    milora_dir = milora.save_adapter(milora.get_model(base(), lora, progress=False), tmp_path / "milora")
    plain_dir = tmp_path / "plain"
    get_peft_model(base(), lora).save_pretrained(plain_dir)
    for adapter in (milora_dir, plain_dir):
        (adapter / "adapter_model.safetensors").unlink()
        (adapter / "adapter_model.bin").write_bytes(pickle.dumps(Exploit(marker)))
    with pytest.raises(AdapterError, match=r"has no adapter_model\.safetensors"):
        milora.load_model(base(), milora_dir)
    with pytest.raises(AdapterError, match=r"pickled adapter_model\.bin, which milora does not load"):
        milora.adapter.open_peft_adapter(base(), plain_dir)
    text = tmp_path / "text.txt"
    text.write_text("The river flows south to the sea. " * 20)
    assert "pickled adapter_model.bin" in cli_error(
        ["eval", "--model", str(model_dir), "--adapter", str(plain_dir), "--task", "forgetting", "--data", str(text),
         "--output", str(tmp_path / "r.json")])
    assert "adapter_model.safetensors" in cli_error(["merge", str(milora_dir), "--model", str(model_dir),
                                                     "--output", str(tmp_path / "merged")])
    assert not marker.exists() and not (tmp_path / "r.json").exists() and not (tmp_path / "merged").exists()
