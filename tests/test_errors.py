"""Bad input: a clear message naming the problem and the fix, the model untouched, nothing half-written."""

from __future__ import annotations

import json
import os

import pytest
import torch
from peft import LoraConfig

import milora
import milora.adapter.save
from milora.errors import UsageError

from conftest import LLAMA_TARGETS, tiny_llama


def assert_untouched(model, reference):
    assert not any("lora_" in name for name, _ in model.named_parameters())
    state, expected = model.state_dict(), reference.state_dict()
    assert list(state) == list(expected)
    for (name, p), q in zip(state.items(), expected.values(), strict=True):
        assert torch.equal(p, q), name


def config(**overrides):
    return LoraConfig(**{"r": 4, "target_modules": LLAMA_TARGETS, **overrides})


def test_missing_target_module():
    model = tiny_llama()
    with pytest.raises(ValueError, match=r"Target module\(s\) \['qkv'\] not found.*q_proj"):
        milora.get_model(model, config(target_modules=["q_proj", "qkv"]))
    assert_untouched(model, tiny_llama())


def test_rank_too_large_names_layer_and_limit():
    model = tiny_llama()
    with pytest.raises(ValueError, match=r"Rank 40 is too large for model.layers.0.self_attn.k_proj \(32 x 64\)"
                                         r".*min\(out, in\) = 32"):
        milora.get_model(model, config(r=40))
    assert_untouched(model, tiny_llama())


def test_rank_pattern_checked_too():
    with pytest.raises(ValueError, match=r"Rank 40 is too large for model\.layers\.0\.self_attn\.v_proj"):
        milora.get_model(tiny_llama(), config(rank_pattern={"v_proj": 40}))


def test_quantised_layer_detected_by_class():
    model = tiny_llama()
    Linear4bit = type("Linear4bit", (torch.nn.Linear,), {"__module__": "bitsandbytes.nn.modules"})
    old = model.model.layers[0].self_attn.q_proj
    model.model.layers[0].self_attn.q_proj = Linear4bit(old.in_features, old.out_features, bias=False)
    with pytest.raises(ValueError, match=r"q_proj is quantised \(bitsandbytes Linear4bit\).*without quantisation"):
        milora.get_model(model, config())
    assert not any("lora_" in name for name, _ in model.named_parameters())


def test_integer_weight():
    model = tiny_llama()
    layer = model.model.layers[1].mlp.up_proj
    layer.weight = torch.nn.Parameter(torch.zeros_like(layer.weight, dtype=torch.int8), requires_grad=False)
    with pytest.raises(ValueError, match=r"up_proj has a torch\.int8 weight: load the model in float32"):
        milora.get_model(model, config())


def test_non_finite_weight():
    model = tiny_llama()
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight[3, 5] = float("nan")
    with pytest.raises(ValueError, match="down_proj has NaN or Inf"):
        milora.get_model(model, config())
    assert not any("lora_" in name for name, _ in model.named_parameters())


def test_unsupported_module_type():
    with pytest.raises(ValueError, match=r"embed_tokens is a Embedding; MiLoRA supports torch\.nn\.Linear"):
        milora.get_model(tiny_llama(), config(target_modules=["embed_tokens"]))


def test_unknown_init_mode_and_solver():
    with pytest.raises(ValueError, match=r"Unknown init mode 'minor'.*milora, pissa, middle, random, lora"):
        milora.get_model(tiny_llama(), config(), init="minor")
    with pytest.raises(ValueError, match="Unknown solver 'arnoldi'"):
        milora.get_model(tiny_llama(), config(), solver="arnoldi")
    with pytest.raises(ValueError, match="use solver='svd' for selection 'random'"):
        milora.get_model(tiny_llama(), config(), init="random", solver="eigh")


@pytest.mark.parametrize("options,message", [
    ({"r": 0}, "LoraConfig.r .* must be positive for init='milora', got 0"),
    ({"r": 4, "rank_pattern": {"k_proj": 0}}, "LoraConfig.r .* must be positive"),
    ({"r": 4, "lora_alpha": -1}, "LoraConfig.lora_alpha .* must be positive for init='milora', got -1"),
    ({"r": 4, "lora_alpha": 0}, "LoraConfig.lora_alpha .* must be positive"),
    ({"r": 4, "alpha_pattern": {"up_proj": -2}}, "LoraConfig.lora_alpha .* must be positive"),
])
def test_non_positive_rank_or_alpha(options, message):
    """A non-positive scaling would make B = U sqrt(S / s) NaN: rejected before any change."""
    model = tiny_llama()
    with pytest.raises(ValueError, match=message):
        milora.get_model(model, LoraConfig(target_modules=LLAMA_TARGETS, **options))
    assert_untouched(model, tiny_llama())


def test_model_already_wrapped_and_bad_seed(tmp_path):
    peft_model = milora.get_model(tiny_llama(), config(), progress=False)
    for model in (peft_model, peft_model.get_base_model()):
        with pytest.raises(ValueError, match="already holds PEFT adapter layers; milora needs the original base model"):
            milora.get_model(model, config())
    with pytest.raises(UsageError, match="seed must be an integer, got 'x'"):
        milora.get_model(tiny_llama(), config(), init="random", seed="x")
    (tmp_path / "file").write_text("mine")
    for overwrite in (False, True):
        with pytest.raises(FileExistsError, match="is a file, not a directory"):
            milora.save_adapter(peft_model, tmp_path / "file", overwrite=overwrite)
    assert (tmp_path / "file").read_text() == "mine"


def test_bad_workers_and_cpu_only_options():
    model = tiny_llama()
    with pytest.raises(UsageError, match="workers must be a positive integer, got 0"):
        milora.get_model(model, config(), workers=0)
    with pytest.raises(UsageError, match="workers must be a positive integer, got True"):
        milora.get_model(model, config(), workers=True)
    with pytest.raises(ValueError, match=r"The lanczos solver runs on CPU, but decompositions would run on \['meta'\]"):
        milora.get_model(model, config(), solver="lanczos", device="meta")
    with pytest.raises(ValueError, match=r"workers=2 runs several CPU decompositions at once; "
                                         r"decompositions on \['meta'\] need workers=1"):
        milora.get_model(model, config(), workers=2, device="meta")
    with pytest.raises(ValueError, match=r"device='gpu0' is not usable on this machine \(.*\); use 'cpu' or omit it"):
        milora.get_model(model, config(), device="gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="device='cuda' is not usable on this machine"):
            milora.get_model(model, config(), device="cuda")
    assert_untouched(model, tiny_llama())


def test_tied_target_weights():
    model = tiny_llama()
    model.model.layers[1].mlp.up_proj.weight = model.model.layers[0].mlp.up_proj.weight
    reference = tiny_llama()
    reference.model.layers[1].mlp.up_proj.weight = reference.model.layers[0].mlp.up_proj.weight
    with pytest.raises(ValueError,
                       match=r"model\.layers\.0\.mlp\.up_proj and model\.layers\.1\.mlp\.up_proj share one weight"):
        milora.get_model(model, config())
    assert_untouched(model, reference)


def test_conflicting_lora_options():
    with pytest.raises(ValueError, match=r"leave LoraConfig\.init_lora_weights at its default"):
        milora.get_model(tiny_llama(), config(init_lora_weights="pissa"))
    with pytest.raises(ValueError, match="use_dora=True is not supported"):
        milora.get_model(tiny_llama(), config(use_dora=True))


@pytest.fixture
def saved(tmp_path):
    model = milora.get_model(tiny_llama(), config(), progress=False)
    return milora.save_adapter(model, tmp_path / "adapter")


@pytest.mark.parametrize("filename", ["adapter_config.json", "adapter_model.safetensors", "milora_config.json"])
def test_missing_adapter_file(saved, filename):
    os.remove(saved / filename)
    with pytest.raises(FileNotFoundError, match=f"has no {filename}: it is not a complete milora adapter"):
        milora.load_model(tiny_llama(), saved)


def test_corrupt_weights_file(saved):
    path = saved / "adapter_model.safetensors"
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(ValueError, match=r"adapter_model\.safetensors is corrupt"):
        milora.load_model(tiny_llama(), saved)


def test_corrupt_json(saved):
    (saved / "milora_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="corrupt JSON"):
        milora.load_model(tiny_llama(), saved)


def test_weights_that_do_not_fit(saved):
    """Both config files edited alike (so they agree): the tensors' shapes no longer fit them.
    (Editing one file only is refused earlier: see test_reliability.py.) A str path, as in the README."""
    for name, rank in (("milora_config.json", 3), ("adapter_config.json", 6)):
        values = json.loads((saved / name).read_text())
        values["r"] = rank
        (saved / name).write_text(json.dumps(values))
    model = tiny_llama()
    with pytest.raises(ValueError, match=r"has shape .* expected"):
        milora.load_model(model, str(saved))
    assert_untouched(model, tiny_llama())


def test_fingerprint_mismatch(saved):
    model = tiny_llama(seed=1)
    with pytest.raises(ValueError, match="initialised from different base weights"):
        milora.load_model(model, saved)
    assert_untouched(model, tiny_llama(seed=1))


def test_residual_model_is_not_accepted_as_base(saved):
    residual = milora.get_model(tiny_llama(), config(), progress=False).get_base_model()
    state = {k.replace(".base_layer.", "."): v for k, v in residual.state_dict().items() if "lora_" not in k}
    model = tiny_llama()
    model.load_state_dict(state)
    with pytest.raises(ValueError, match="not a residual or merged model"):
        milora.load_model(model, saved)


def test_plain_peft_adapter_is_refused(tmp_path):
    from peft import get_peft_model

    get_peft_model(tiny_llama(), config()).save_pretrained(tmp_path / "plain")
    with pytest.raises(FileNotFoundError, match="plain PEFT adapter"):
        milora.load_model(tiny_llama(), tmp_path / "plain")


def test_save_refuses_existing_directory_and_model_without_record(saved, tmp_path):
    model = milora.get_model(tiny_llama(), config(), progress=False)
    before = sorted(p.name for p in saved.iterdir())
    with pytest.raises(FileExistsError, match="overwrite=True"):
        milora.save_adapter(model, saved)
    assert sorted(p.name for p in saved.iterdir()) == before
    from peft import get_peft_model

    with pytest.raises(ValueError, match=r"not made by milora\.get_model"):
        milora.save_adapter(get_peft_model(tiny_llama(), config()), tmp_path / "x")


def test_failed_save_leaves_nothing(tmp_path, monkeypatch):
    model = milora.get_model(tiny_llama(), config(), progress=False)

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(milora.adapter.save, "write_safetensors", broken)
    with pytest.raises(OSError, match="disk full"):
        milora.save_adapter(model, tmp_path / "adapter")
    assert list(tmp_path.iterdir()) == []
