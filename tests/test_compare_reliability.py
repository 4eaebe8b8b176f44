"""`milora compare` under damage: broken run records, and the report's interval."""

from __future__ import annotations

import json

import pytest

from milora.comparison.runner import read_record
from milora.comparison.worker import RECORD

GOOD = {"method": "lora", "learning_rate": 0.01, "seed": 0, "status": "done"}


@pytest.mark.parametrize("text", ["", '{"method": "lora", "stat', "{}", "[1, 2]", "null", '"done"',
                                  json.dumps({**GOOD, "status": "running"}), "\xff\xfe"],
                         ids=["empty", "truncated", "empty object", "list", "null", "string", "unknown status",
                              "not utf-8"])
def test_a_broken_run_record_is_named_and_the_run_is_unfinished(tmp_path, capsys, text):
    (tmp_path / RECORD).write_bytes(text.encode("latin-1") if text == "\xff\xfe" else text.encode())
    assert read_record(tmp_path) is None
    assert f"{tmp_path / RECORD} " in capsys.readouterr().err


def test_a_good_run_record_is_read(tmp_path, capsys):
    (tmp_path / RECORD).write_text(json.dumps(GOOD))
    assert read_record(tmp_path) == GOOD and capsys.readouterr().err == ""
