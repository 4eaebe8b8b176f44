"""Issue 22, round 2, the rest: echoed values cut and alias bombs in overrides, evaluation records checked
before any work, ambiguous AlpacaEval ids, outputs checked up front and I/O errors as messages, the
streaming init's residual adapter."""

from __future__ import annotations

import re

import pytest

from milora.errors import ConfigError

from conftest import cli_error

LEVELS = ["&a [" + ", ".join(["x"] * 10) + "]"] + [f"&{name} [" + ", ".join([f"*{previous}"] * 10) + "]"
                                                    for previous, name in zip("abcdefgh", "bcdefghi", strict=True)]
BOMB = "[" + ", ".join(LEVELS) + "]"  # 9 levels of 10: a billion values once expanded


def test_an_alias_bomb_in_an_override_is_refused_quickly():
    from milora.training.config import parse_overrides

    with pytest.raises(ConfigError, match="alias bomb") as caught:
        parse_overrides([f"lora_rank={BOMB}"])
    assert len(str(caught.value)) < 500
    assert parse_overrides(["trainer_args={a: &x 1, b: *x}", "lora_rank=8"]) == {"trainer_args": {"a": 1, "b": 1},
                                                                             "lora_rank": 8}


HUGE = "x" * 10**6


@pytest.mark.parametrize("key,value", [("lora_rank", HUGE), ("init", HUGE), ("lora_" + HUGE, 1)],
                         ids=["wrong type", "not a choice", "unknown key"])
def test_a_huge_value_is_not_echoed_whole(tmp_path, key, value):
    from milora.training.config import from_dict

    with pytest.raises(ConfigError) as caught:
        from_dict({"dataset": "d.json", "output_dir": str(tmp_path / "out"), key: value})
    assert len(str(caught.value)) < 1000 and re.search(r"\(100000\d characters\)", str(caught.value))


def test_a_huge_override_is_not_echoed_whole_by_the_cli(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text(f"dataset: d.json\noutput_dir: {tmp_path / 'out'}\n")
    message = cli_error(["train", str(config), "lora_rank=" + "9x" * 500_000])
    assert len(message) < 1000 and "1000000 characters" in message
    sweep_message = cli_error(["compare", str(config), "learning_rates=" + "y" * 10**6])
    assert len(sweep_message) < 2000
