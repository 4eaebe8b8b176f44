"""TrainConfig: parsing, validation and error messages (no model needed)."""

import json

import pytest
import yaml

from milora.training.config import (
    ConfigError,
    from_dict,
    key_help,
    load_config,
    parse_overrides,
    save_config,
    valid_keys,
)


@pytest.fixture
def data_file(tmp_path):
    path = tmp_path / "data.json"
    path.write_text(json.dumps([{"instruction": "Say hi", "input": "", "output": "hi"}]))
    return path


def minimal(data_file, tmp_path, **extra):
    return {"dataset": str(data_file), "output_dir": str(tmp_path / "out"), **extra}


def test_issue_key_names_exist():
    required = {
        "model", "dataset", "template", "init", "lora_rank", "lora_alpha", "lora_target", "learning_rate", "max_steps",
        "per_device_train_batch_size", "cutoff_len", "seed", "output_dir", "lora_dropout", "lr_scheduler",
        "warmup_steps", "num_train_epochs", "gradient_accumulation_steps", "bf16",
    }
    assert required <= set(valid_keys())


KIND_TYPES = {"int": int, "float": float, "bool": bool, "str": str, "strlist": list, "mapping": dict}


def test_listed_keys_kinds_and_defaults_are_what_from_dict_does(data_file, tmp_path):
    """valid_keys / key_help / to_dict checked against from_dict's behaviour, key by key (they all read
    TrainConfig.model_fields, so comparing them with model_fields would prove nothing)."""
    given = minimal(data_file, tmp_path)
    config = from_dict(given)
    rows = {key: (kind, default) for key, kind, default, _ in key_help()}
    assert len(rows) == len(key_help()) == len(valid_keys())  # each key listed once
    assert set(rows) == set(valid_keys()) == set(vars(config))  # the attributes a parsed config has
    assert config.to_dict() == {key: getattr(config, key) for key in vars(config)}
    for key, (kind, default) in rows.items():
        if key not in given:
            assert getattr(config, key) == default, key  # the listed default is the one a missing key gets
        if default is not None:
            assert from_dict({**given, key: default}) == config, key  # ... and giving it changes nothing
            assert type(default) is KIND_TYPES.get(kind.rstrip("?"), type(default)), (key, kind, default)
        optional = kind.endswith("?")
        if key not in given:  # null is accepted exactly for the keys listed as optional
            if optional:
                assert getattr(from_dict({**given, key: None}), key) is None, key
            else:
                with pytest.raises(ConfigError, match=f"'{key}' must not be empty"):
                    from_dict({**given, key: None})


def test_minimal_config_defaults(data_file, tmp_path):
    config = from_dict(minimal(data_file, tmp_path))
    assert config.model is None  # the embedded SmolLM2
    assert config.template == "alpaca" and config.init == "milora"
    assert config.lora_target == ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]
    assert config.resolved_alpha() == config.lora_rank
    assert from_dict(minimal(data_file, tmp_path, init="lora", lora_rank=8)).resolved_alpha() == 16
    assert from_dict(minimal(data_file, tmp_path, lora_alpha=3)).resolved_alpha() == 3


def test_unknown_key_names_closest(data_file, tmp_path):
    with pytest.raises(ConfigError, match=r"unknown key 'learning_rat': did you mean 'learning_rate'\?"):
        from_dict(minimal(data_file, tmp_path, learning_rat=1e-4))
    with pytest.raises(ConfigError, match=r"'lora_rank'"):
        load_config(minimal(data_file, tmp_path), ["lora_rnak=8"])
    with pytest.raises(ConfigError, match="--list-keys"):
        from_dict(minimal(data_file, tmp_path, zzzzzz=1))


@pytest.mark.parametrize(
    ("key", "value", "words"),
    [
        ("lora_rank", "eight", "an integer"),
        ("lora_rank", True, "an integer"),
        ("learning_rate", "fast", "a number"),
        ("bf16", "yes", "true or false"),
        ("lora_target", ["q_proj", 3], "a comma-separated string or a list of strings"),
        ("template", 5, "a non-empty string"),
        ("resume_from_checkpoint", 3, "a checkpoint path or true"),
    ],
)
def test_wrong_types(data_file, tmp_path, key, value, words):
    with pytest.raises(ConfigError, match=rf"'{key}' must be {words}"):
        from_dict(minimal(data_file, tmp_path, **{key: value}))


def test_lenient_but_exact_coercions(data_file, tmp_path):
    config = from_dict(minimal(data_file, tmp_path, learning_rate="3e-4", lora_target="q_proj, v_proj", max_steps=10.0))
    assert config.learning_rate == 3e-4  # YAML 1.1 reads 3e-4 as a string
    assert config.lora_target == ["q_proj", "v_proj"]
    assert config.max_steps == 10
    with pytest.raises(ConfigError, match="'max_steps' must be an integer"):
        from_dict(minimal(data_file, tmp_path, max_steps=10.5))


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"init": "milorra"}, r"'init' must be one of .* \(did you mean 'milora'\?\)"),
        ({"lora_rank": 0}, "'lora_rank' must be at least 1"),
        ({"lora_dropout": 1.0}, "'lora_dropout' must be below 1"),
        ({"lora_alpha": 0}, "'lora_alpha' must be positive, got 0"),
        ({"bf16": True, "fp16": True}, "choose one mixed-precision mode"),
        ({"eval_steps": 10}, "val_size"),
        ({"val_size": 2.5}, "fraction below 1 or a whole count"),
        ({"dataset_split": "test"}, "single local file"),
        ({"lora_target": ""}, "'lora_target' is empty"),
    ],
)
def test_invalid_values(data_file, tmp_path, extra, message):
    with pytest.raises(ConfigError, match=message):
        from_dict(minimal(data_file, tmp_path, **extra))


def test_required_keys(data_file, tmp_path):
    with pytest.raises(ConfigError, match="'dataset' is required"):
        from_dict({"output_dir": str(tmp_path)})
    with pytest.raises(ConfigError, match="'output_dir' is required"):
        from_dict({"dataset": str(data_file)})


def test_missing_dataset_file(tmp_path):
    with pytest.raises(ConfigError, match=r"dataset file not found: .*missing\.jsonl"):
        from_dict({"dataset": str(tmp_path / "missing.jsonl"), "output_dir": str(tmp_path / "out")})
    assert not (tmp_path / "out").exists()


def test_hub_names_are_not_checked_locally(tmp_path):
    config = from_dict({"dataset": "meta-math/MetaMathQA", "dataset_split": "train[:100000]",
                        "output_dir": str(tmp_path)})
    assert not config.is_local_dataset()


def test_yaml_file_overrides_and_round_trip(data_file, tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(minimal(data_file, tmp_path, lora_rank=4, learning_rate="1e-3")))
    config = load_config(path, ["lora_rank=8", "lora_target=[q_proj, v_proj]", "bf16=true"])
    assert ((config.lora_rank, config.lora_target, config.bf16, config.learning_rate)
            == (8, ["q_proj", "v_proj"], True, 1e-3))
    save_config(config, tmp_path / "saved.yaml")
    assert load_config(tmp_path / "saved.yaml") == config
    assert load_config(config) == config


def test_bad_files_and_overrides(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(tmp_path / "list.yaml")
    (tmp_path / "empty.yaml").write_text("")
    with pytest.raises(ConfigError, match="is empty"):
        load_config(tmp_path / "empty.yaml")
    with pytest.raises(ConfigError, match="key=value"):
        parse_overrides(["max_steps"])
    assert parse_overrides(["max_steps=5", "model="]) == {"max_steps": 5, "model": None}


def test_to_dict_is_complete_and_round_trips(data_file, tmp_path):
    """Every value survives to_dict -> YAML -> load_config, with non-default values in every kind."""
    config = from_dict(minimal(data_file, tmp_path, lora_rank=5, lora_alpha=2.5, use_rslora=True,
                               lora_target="q_proj,v_proj", max_steps=7, trainer_args={"adam_beta2": 0.95},
                               resume_from_checkpoint=True, model="some/model", seed=3))
    dumped = config.to_dict()
    assert dumped == {key: getattr(config, key) for key in vars(config)} and set(dumped) == set(valid_keys())
    assert load_config(yaml.safe_load(yaml.safe_dump(dumped))) == config
