"""Integration on the real pretrained SmolLM2-135M-Instruct (dequantised Q4_1 weights).

Tolerances as in test_persistence: exact reload through milora's loader, relative error
< 1e-5 at init and through plain PEFT (float32 rounding only).
"""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, PeftModel

import milora
from milora.constants import PAPER_TARGETS

pytestmark = pytest.mark.slow


def relative_error(a, b) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def test_smollm2_init_and_round_trip(tmp_path):
    model, tokenizer = milora.load_base_model()
    tokens = tokenizer(["MiLoRA adapts the minor singular components of each weight."], return_tensors="pt").input_ids
    with torch.no_grad():
        original = model(tokens).logits
    peft_model = milora.get_model(model, LoraConfig(r=16, lora_alpha=16, target_modules=list(PAPER_TARGETS)),
                                  progress=False)
    with torch.no_grad():
        at_init = peft_model(tokens).logits
    assert relative_error(at_init, original) < 1e-5
    summary = peft_model.milora_init.summary()
    assert summary["weights"] == 150 and summary["max_reconstruction_error"] < 1e-6

    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-3)
    peft_model.train()
    for _ in range(2):
        peft_model(tokens, labels=tokens).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    peft_model.eval()
    with torch.no_grad():
        trained = peft_model(tokens).logits
    assert relative_error(trained, original) > 1e-4
    milora.save_adapter(peft_model, tmp_path / "adapter")

    base, _ = milora.load_base_model()
    reloaded = milora.load_model(base, tmp_path / "adapter")
    with torch.no_grad():
        assert torch.equal(reloaded(tokens).logits, trained)
    plain = PeftModel.from_pretrained(milora.load_base_model()[0], tmp_path / "adapter")
    with torch.no_grad():
        assert relative_error(plain(tokens).logits, trained) < 1e-5


def test_demo_end_to_end(tmp_path):
    """`milora demo` (README's first command) at a tenth of its size: every stage runs on the real
    model, the report it prints is the one it saves, and the adapter reloads through plain PEFT."""
    import json
    import math

    from milora.demos.text import run_demo

    report = run_demo(tmp_path / "demo", train_size=16, eval_size=8, max_steps=2, batch_size=4)
    assert json.loads((tmp_path / "demo" / "report.json").read_text()) == json.loads(json.dumps(report))
    assert (report["train_examples"], report["held_out_items"], report["steps"]) == (16, 8, 2)
    for key in ("accuracy_before", "accuracy_after", "mean_score_before", "mean_score_after"):
        assert 0.0 <= report[key] <= 1.0, key
    assert all(math.isfinite(loss) for _, loss in report["loss_curve"]) and report["loss_curve"]
    trained = [json.loads(line)["messages"][0]["content"] for line in (tmp_path / "demo" / "train.jsonl").open()]
    assert not {item["question"] for item in report["examples_after"]} & set(trained)  # held-out stays held out
    adapter = tmp_path / "demo" / "adapter"
    assert (adapter / "adapter_model.safetensors").is_file() and not list(adapter.rglob("*.bin"))
    PeftModel.from_pretrained(milora.load_base_model()[0], report["adapter_dir"])
