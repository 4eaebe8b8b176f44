"""Nothing lost, nothing silently wrong: one test per defect found by probing (issue 10).

Each test fails on the code before the fix. Tiny random models throughout (conftest).
"""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from peft import LoraConfig, PeftModel
from safetensors.torch import load_file, save_file

import milora
from milora.cli import main
from milora.errors import AdapterError, ConfigError, DataError, OutputError
from milora.io import LOCK_FILE, RunLock, check_replaceable
from milora.training.run import train

from conftest import LLAMA_TARGETS, RECORDS, cli_error, run_config, tiny_llama


def tree(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.fixture
def saved(tmp_path):
    peft_model = milora.get_model(tiny_llama(), LoraConfig(r=4, target_modules=LLAMA_TARGETS), progress=False)
    return milora.save_adapter(peft_model, tmp_path / "adapter")


# ---------------------------------------------------------------- 1. --overwrite only replaces milora's outputs


def test_overwrite_never_replaces_the_current_directory(tmp_path, tiny, monkeypatch):
    work = tmp_path / "work"
    (work / "sub").mkdir(parents=True)
    (work / "notes.txt").write_text("mine")
    monkeypatch.chdir(work)
    message = cli_error(["init", tiny["model"], "--rank", "2", "--output", ".", "--overwrite"])
    assert "current directory" in message
    assert (work / "notes.txt").read_text() == "mine" and (work / "sub").is_dir()
    message = cli_error(["init", tiny["model"], "--rank", "2", "--output", str(work.parent), "--overwrite"])
    assert "current directory or one of its parents" in message


def test_overwrite_refuses_directories_milora_did_not_write(tmp_path, tiny, saved):
    thesis = tmp_path / "thesis"
    thesis.mkdir()
    (thesis / "thesis.tex").write_text("\\begin{document}")
    assert "not an adapter or run directory" in cli_error(
        ["init", tiny["model"], "--rank", "2", "--output", str(thesis), "--overwrite"])
    assert (thesis / "thesis.tex").exists()
    (saved / "notes.txt").write_text("mine")  # an adapter with the user's file inside
    assert "notes.txt" in cli_error(["init", tiny["model"], "--rank", "2", "--output", str(saved), "--overwrite"])
    assert (saved / "notes.txt").exists()
    with pytest.raises(OutputError, match=r"notes\.txt"):
        check_replaceable(saved)


def test_overwrite_replaces_an_adapter(tmp_path, tiny, saved):
    assert main(["init", tiny["model"], "--rank", "2", "--output", str(saved), "--overwrite"]) == 0
    assert json.loads((saved / "milora_config.json").read_text())["r"] == 2


# ---------------------------------------------------------------- 2. one run per output directory


def test_a_second_run_on_a_held_directory_is_refused(tmp_path, tiny):
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        out = tmp_path / "run"
        out.mkdir()
        (out / LOCK_FILE).write_text(json.dumps({"host": os.uname().nodename, "pid": holder.pid, "since": time.time(),
                                                 "purpose": "milora train"}))
        with pytest.raises(OutputError, match=rf"in use by milora train, pid {holder.pid}"):
            train(run_config(tiny, out))
        assert sorted(p.name for p in out.iterdir()) == [LOCK_FILE]  # nothing written, the holder's lock kept
    finally:
        holder.kill()
        holder.wait()
    run = train(run_config(tiny, out, max_steps=1))  # the holder died: its lock is stale and taken over
    assert (run.adapter_dir / "milora_config.json").is_file() and not (out / LOCK_FILE).exists()


def test_a_moved_run_directory_resumes_where_it_is_now(tmp_path, tiny):
    first = tmp_path / "first"
    train(run_config(tiny, first, max_steps=2, save_steps=1))
    moved = tmp_path / "moved"
    first.rename(moved)
    run = train(run_config(tiny, moved, max_steps=3, save_steps=1, resume_from_checkpoint=True))
    assert run.metrics["loss_history"] and (moved / "checkpoint-3").is_dir()


def _take_lock(directory, barrier, results):
    barrier.wait()
    try:
        RunLock(directory).acquire()
        results.put("held")
        time.sleep(1)
    except OutputError:
        results.put("refused")


def test_lock_is_exclusive_between_processes(tmp_path):
    import multiprocessing

    context = multiprocessing.get_context("fork")
    barrier, results = context.Barrier(4), context.Queue()
    workers = [context.Process(target=_take_lock, args=(tmp_path / "run", barrier, results)) for _ in range(4)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(30)
    outcomes = sorted(results.get(timeout=5) for _ in workers)
    assert outcomes == ["held", "refused", "refused", "refused"]


# ----------------------------------------------------------- 3. checkpoints are atomic, resume takes a complete one


def test_resume_skips_an_incomplete_checkpoint(tmp_path, tiny, capsys):
    reference = train(run_config(tiny, tmp_path / "reference", save_steps=3))
    out = tmp_path / "killed"
    train(run_config(tiny, out, save_steps=3))
    for name in ("adapter_model.safetensors", "adapter_config.json", "milora_config.json", "metrics.json"):
        (out / name).unlink()
    (out / "checkpoint-6" / "trainer_state.json").unlink()  # what a kill while writing it left (older milora)
    (out / "checkpoint-6" / "optimizer.pt").write_bytes(b"")
    capsys.readouterr()
    resumed = train(run_config(tiny, out, save_steps=3, resume_from_checkpoint=True))
    assert "skipping" in capsys.readouterr().err
    expected, found = load_file(reference.adapter_dir / "adapter_model.safetensors"), load_file(
        resumed.adapter_dir / "adapter_model.safetensors")
    assert all(torch.equal(expected[key], found[key]) for key in expected)


def test_a_checkpoint_killed_while_saving_is_not_there(tmp_path, tiny, monkeypatch):
    from milora.training.trainer import MiloraTrainer

    original = MiloraTrainer._save_rng_state

    def killed(self, output_dir):
        if self.state.global_step == 6:
            raise KeyboardInterrupt  # stands in for kill -9 half-way through writing checkpoint-6
        return original(self, output_dir)

    monkeypatch.setattr(MiloraTrainer, "_save_rng_state", killed)
    with pytest.raises(KeyboardInterrupt):
        train(run_config(tiny, tmp_path / "run", save_steps=3))
    names = sorted(p.name for p in (tmp_path / "run").iterdir())
    assert "checkpoint-3" in names and "checkpoint-6" not in names


# ---------------------------------------------------------------- 4. resuming at the last step trains no extra step


def test_resume_from_the_last_checkpoint_trains_no_extra_step(tmp_path, tiny):
    """50 examples in batches of 4: 13 steps an epoch, so max_steps=12 ends mid-epoch (constant lr:
    an extra step would change the adapter)."""
    data = tmp_path / "data50.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in RECORDS + RECORDS[:2]))
    settings = {"dataset": str(data), "max_steps": 12, "save_steps": 3, "lr_scheduler": "constant"}
    reference = train(run_config(tiny, tmp_path / "reference", **settings))
    out = tmp_path / "killed"
    train(run_config(tiny, out, **settings))
    for name in ("adapter_model.safetensors", "adapter_config.json", "milora_config.json", "metrics.json"):
        (out / name).unlink()  # killed after checkpoint-12, before the final save
    resumed = train(run_config(tiny, out, resume_from_checkpoint=True, **settings))
    assert resumed.metrics["global_step"] == 12 and not (out / "checkpoint-13").exists()
    expected, found = load_file(reference.adapter_dir / "adapter_model.safetensors"), load_file(
        out / "adapter_model.safetensors")
    assert all(torch.equal(expected[key], found[key]) for key in expected)


# ---------------------------------------------------------------- 5. corrupted and non-finite tensors are refused


def _flip_bits(path: Path, offset_from_end: int = 64) -> None:
    data = bytearray(path.read_bytes())
    data[-offset_from_end] ^= 0xFF
    path.write_bytes(bytes(data))


def test_flipped_bits_fail_the_checksum(saved, tmp_path, tiny):
    _flip_bits(saved / "adapter_model.safetensors")
    with pytest.raises(AdapterError, match="does not match the checksum"):
        milora.load_model(tiny_llama(), saved)
    model_dir = tmp_path / "model"
    tiny_llama().save_pretrained(model_dir)
    assert "checksum" in cli_error(["merge", str(saved), "--model", str(model_dir), "--output", str(tmp_path / "m")])
    assert "checksum" in cli_error(["analyze", str(saved), "--model", str(model_dir)])
    assert not (tmp_path / "m").exists()


def test_non_finite_weights_are_refused_everywhere(saved, tmp_path, tiny):
    peft_model = milora.get_model(tiny_llama(), LoraConfig(r=4, target_modules=LLAMA_TARGETS), progress=False)
    with torch.no_grad():
        next(iter(milora.init.lora_layers(peft_model).values())).lora_B["default"].weight[0, 0] = float("nan")
    with pytest.raises(AdapterError, match=r"tensor .*lora_B.weight holds NaN"):
        milora.save_adapter(peft_model, tmp_path / "nan")  # a diverged training is not saved as an adapter
    plain = tmp_path / "plain"  # a plain PEFT LoRA with NaN: eval and analyze refuse it, naming the tensor
    PeftModel.save_pretrained(get_plain_lora(), plain)
    weights = load_file(plain / "adapter_model.safetensors")
    first = sorted(weights)[0]
    weights[first][0, 0] = float("inf")
    save_file(weights, plain / "adapter_model.safetensors")
    model_dir = tmp_path / "model"
    tiny_llama().save_pretrained(model_dir)
    assert first in cli_error(["analyze", str(plain), "--model", str(model_dir)])
    message = cli_error(["eval", "--model", tiny["model"], "--adapter", str(plain), "--task", "forgetting",
                         "--data", str(_text(tmp_path)), "--output", str(tmp_path / "r.json")])
    assert first in message and not (tmp_path / "r.json").exists()


def get_plain_lora():
    from peft import get_peft_model

    return get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=LLAMA_TARGETS, init_lora_weights=False))


def _text(tmp_path: Path) -> Path:
    path = tmp_path / "text.txt"
    path.write_text("The river flows south to the sea. " * 20)
    return path


# ---------------------------------------------------------------- 6. messages instead of tracebacks


def test_missing_model_path_is_a_message(tmp_path, saved):
    missing = str(tmp_path / "nonexistent")
    for command in (["init", missing, "--output", str(tmp_path / "o")],
                    ["merge", str(saved), "--model", missing, "--output", str(tmp_path / "m")],
                    ["eval", "--model", missing, "--task", "forgetting", "--output", str(tmp_path / "r.json")],
                    ["analyze", str(saved), "--model", missing]):
        assert re.search(r"model .*nonexistent does not exist", cli_error(command)), command
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]


def test_init_onto_a_file_is_a_message(tmp_path, tiny):
    (tmp_path / "file").write_text("x")
    assert "is a file" in cli_error(["init", tiny["model"], "--rank", "2", "--output", str(tmp_path / "file")])


def test_non_utf8_training_data_names_the_file(tmp_path, tiny):
    data = tmp_path / "latin1.jsonl"
    data.write_bytes(json.dumps({"instruction": "Café", "output": "x"}).replace("é", "\\u00e9").encode()
                     + "\n{\"instruction\": \"Caf\xe9\", \"output\": \"y\"}\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"latin1.jsonl is not UTF-8"):
        train(run_config(tiny, tmp_path / "out", dataset=str(data)))
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("change", [{"lora_rank": 2}, {"lora_alpha": 8.0}, {"init": "pissa"}])
def test_resume_with_other_settings_is_refused_and_the_record_kept(tmp_path, tiny, change):
    out = tmp_path / "run"
    train(run_config(tiny, out, save_steps=3))
    record = (out / "train_config.yaml").read_text()
    config = tmp_path / "resume.yaml"
    config.write_text(yaml.safe_dump(run_config(tiny, out, save_steps=3, resume_from_checkpoint=True, **change)))
    key = next(iter(change))
    message = cli_error(["train", str(config)])
    assert re.search(rf"{key}={change[key]!r} but the run used", message)
    assert (out / "train_config.yaml").read_text() == record  # 8. a refused resume does not rewrite the record


# ---------------------------------------------------------------- 7. result paths checked before the work


def test_eval_output_checked_before_the_work(tmp_path):
    model_dir = tmp_path / "model"
    tiny_llama().save_pretrained(model_dir)
    text = _text(tmp_path)
    (tmp_path / "adir").mkdir()
    (tmp_path / "afile").write_text("x")
    base = ["eval", "--model", str(model_dir), "--task", "forgetting", "--data", str(text)]
    assert "is a directory" in cli_error([*base, "--output", str(tmp_path / "adir")])
    assert "is a file, so" in cli_error([*base, "--output", str(tmp_path / "afile" / "r.json")])


# ---------------------------------------------------------------- 9. the two configs of an adapter agree


@pytest.mark.parametrize("file,key,value", [
    ("milora_config.json", "lora_alpha", 9.0),
    ("adapter_config.json", "lora_alpha", 18.0),
    ("adapter_config.json", "target_modules", ["q_proj", "v_proj"]),
])
def test_edited_configs_are_refused_naming_both_values(saved, file, key, value):
    values = json.loads((saved / file).read_text())
    values[key] = value
    (saved / file).write_text(json.dumps(values))
    with pytest.raises(AdapterError, match=rf"adapter_config.json has {key}=.* but milora_config.json implies"):
        milora.load_model(tiny_llama(), saved)


# ---------------------------------------------------------------- 10. rank-deficient weights


def _rank_deficient_llama():
    model = tiny_llama()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.down_proj.weight[:8] = 0  # 64 x 96: 8 zero rows, rank 56
    return model


def test_dead_components_warn_and_random_null_space_trains(tokens):
    config = LoraConfig(r=12, target_modules=["down_proj"])
    with pytest.warns(UserWarning, match=r"rank-deficient.*null_space='random'"):
        dead = milora.get_model(_rank_deficient_llama(), config, progress=False)
    assert all(entry["zero_components"] == 8 for entry in dead.milora_init.report)
    base = _rank_deficient_llama()
    alive = milora.get_model(_rank_deficient_llama(), config, progress=False, null_space="random")
    with torch.no_grad():
        expected = base(tokens).logits.double()
        assert float((alive(tokens).logits.double() - expected).norm() / expected.norm()) < 1e-5  # same model at init
    layer = next(iter(milora.init.lora_layers(alive).values()))
    zero = layer.lora_B["default"].weight.abs().sum(0) == 0
    assert int(zero.sum()) == 8 and bool((layer.lora_A["default"].weight[zero].norm(dim=1) > 0.5).all())
    alive(tokens, labels=tokens).loss.backward()  # B's zero columns get a gradient: those directions train
    assert float(layer.lora_B["default"].weight.grad[:, zero].abs().sum()) > 0


# ---------------------------------------------------------------- 11. the smaller ones


def test_zero_learning_rate_warns_and_long_cutoff_is_refused(tmp_path, tiny):
    with pytest.warns(UserWarning, match="learning_rate is 0"):
        milora.load_config(run_config(tiny, tmp_path / "a", learning_rate=0))
    with pytest.raises(ConfigError, match="cutoff_len=1024 is above the model's max_position_embeddings=512"):
        train(run_config(tiny, tmp_path / "b", cutoff_len=1024))
    assert not (tmp_path / "b").exists()


def test_duplicate_yaml_keys_are_refused(tmp_path, tiny):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(run_config(tiny, tmp_path / "out")) + "learning_rate: 0.5\n")
    with pytest.raises(ConfigError, match=r"key 'learning_rate' is given twice \(lines \d+ and \d+\)"):
        milora.load_config(path)


def test_interrupted_init_restores_the_model(monkeypatch, tokens):
    import milora.init.initialize

    calls, original = [], milora.init.initialize.set_adapter_factors

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(milora.init.initialize, "set_adapter_factors", interrupted)
    model, reference = tiny_llama(), tiny_llama()
    with pytest.raises(KeyboardInterrupt) as caught:
        milora.get_model(model, LoraConfig(r=4, target_modules=LLAMA_TARGETS), progress=False)
    assert any("restored to its original weights" in note for note in caught.value.__notes__)
    assert not any("lora_" in name for name, _ in model.named_parameters())
    assert list(model.state_dict()) == list(reference.state_dict())
    for (name, restored), original_weight in zip(model.state_dict().items(), reference.state_dict().values(),
                                                 strict=True):
        assert torch.allclose(restored, original_weight, rtol=0, atol=1e-6 * float(original_weight.abs().max())), name


def test_stale_staging_is_cleaned_and_permissions_are_ordinary(tmp_path, saved, tiny):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f".merged.tmp-{int(dead.stdout)}-abc"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"0" * 1000)
    model_dir = tmp_path / "model"
    tiny_llama().save_pretrained(model_dir)
    old_mask = os.umask(0o022)
    try:
        assert main(["merge", str(saved), "--model", str(model_dir), "--output", str(tmp_path / "merged")]) == 0
        assert main(["analyze", str(saved), "--model", str(model_dir), "--output", str(tmp_path / "r.json")]) == 0
    finally:
        os.umask(old_mask)
    assert not stale.exists()
    assert stat.S_IMODE((tmp_path / "merged").stat().st_mode) == 0o755
    assert {stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "merged").iterdir()} == {0o644}
    assert stat.S_IMODE((saved / "adapter_model.safetensors").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "r.json").stat().st_mode) == 0o644


def test_lm_eval_data_warning_is_in_the_help(capsys):
    with pytest.raises(SystemExit):
        main(["eval", "--help"])
    assert "run that directory's utils.py" in " ".join(capsys.readouterr().out.split())
