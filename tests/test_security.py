"""Remote code: a model directory's own Python (``auto_map``) is never run, nor asked about."""

from __future__ import annotations

import json
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
