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


def test_demo_end_to_end(tmp_path, monkeypatch, capsys):
    """`milora demo` (README's first command) at a tenth of its size: every stage runs on the real
    model; the report it prints and saves holds the values of the scoring passes and of the training
    run (recorded here independently), and the adapter reloads through plain PEFT."""
    import json
    import math
    import re

    import milora.demos.text as demo

    scored, score = [], demo.score
    monkeypatch.setattr(demo, "score", lambda *args, **kwargs: scored.append(score(*args, **kwargs)) or scored[-1])
    report = demo.run_demo(tmp_path / "demo", train_size=16, eval_size=8, max_steps=2, batch_size=4)
    printed = capsys.readouterr().out
    assert json.loads((tmp_path / "demo" / "report.json").read_text()) == json.loads(json.dumps(report))
    before, after = scored
    assert len(before["items"]) == len(after["items"]) == 8
    for key, result in (("before", before), ("after", after)):  # full marks counted here, out of 8 items
        assert report[f"accuracy_{key}"] == sum(item["score"] >= 1.0 for item in result["items"]) / 8
        assert report[f"mean_score_{key}"] == pytest.approx(sum(item["score"] for item in result["items"]) / 8)
    assert report["examples_after"] == after["items"][:5]
    metrics = json.loads((tmp_path / "demo" / "adapter" / "metrics.json").read_text())
    losses = [entry["loss"] for entry in metrics["loss_history"] if "loss" in entry]
    assert [loss for _, loss in report["loss_curve"]] == losses and report["steps"] == metrics["global_step"] == 2
    line = re.search(r"held-out accuracy: ([\d.]+)% before -> ([\d.]+)% after \((\d+) items", printed)
    assert line and (float(line[1]), float(line[2]), int(line[3])) == (
        round(100 * report["accuracy_before"], 1), round(100 * report["accuracy_after"], 1), 8)
    line = re.search(r"training: (\d+) steps on (\d+) examples .* loss ([\d.]+) -> ([\d.]+)", printed)
    assert line and (int(line[1]), int(line[2])) == (2, 16)
    assert (float(line[3]), float(line[4])) == (round(losses[0], 3), round(losses[-1], 3))
    examples = re.findall(r"  e\.g\. .* -> (.*) \(gold (.*)\)", printed)
    assert examples == [(repr(item["output"].strip()), str(item["gold"])) for item in after["items"][:3]]
    assert (report["train_examples"], report["held_out_items"], report["steps"]) == (16, 8, 2)
    for key in ("accuracy_before", "accuracy_after", "mean_score_before", "mean_score_after"):
        assert 0.0 <= report[key] <= 1.0, key
    assert all(math.isfinite(loss) for _, loss in report["loss_curve"]) and report["loss_curve"]
    trained = [json.loads(line)["messages"][0]["content"] for line in (tmp_path / "demo" / "train.jsonl").open()]
    assert not {item["question"] for item in report["examples_after"]} & set(trained)  # held-out stays held out
    adapter = tmp_path / "demo" / "adapter"
    assert (adapter / "adapter_model.safetensors").is_file() and not list(adapter.rglob("*.bin"))
    PeftModel.from_pretrained(milora.load_base_model()[0], report["adapter_dir"])
