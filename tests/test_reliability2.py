"""Reliability round 2 (issue 22): bad values and odd inputs end in a clear error, never a traceback."""

from __future__ import annotations

import json

import pytest

from milora.errors import DataError
from milora.eval import evaluate


def _jsonl(path, records):
    path.write_text("".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records), encoding="utf-8")
    return path


@pytest.mark.parametrize("timeout", [float("nan"), float("inf"), float("-inf")])
def test_humaneval_refuses_a_timeout_that_is_not_finite(tmp_path, timeout):
    answers = _jsonl(tmp_path / "a.jsonl", [{"id": "HumanEval/0", "output": "    return False\n"}])
    with pytest.raises(DataError, match="timeout must be a finite number"):
        evaluate(None, None, "humaneval", predictions=str(answers), limit=1, allow_code_execution=True,
                 timeout=timeout, progress=False)


@pytest.mark.parametrize("ks", [(0,), (-1,), (1, 0)])
def test_humaneval_refuses_pass_k_below_one_with_predictions(tmp_path, ks):
    answers = _jsonl(tmp_path / "a.jsonl", [{"id": "HumanEval/0", "output": "    return False\n"}])
    with pytest.raises(DataError, match="pass_k must be positive integers"):
        evaluate(None, None, "humaneval", predictions=str(answers), limit=1, allow_code_execution=True,
                 pass_k=ks, progress=False)


@pytest.mark.parametrize("separator", ["\u2028", "\u0085", "\u2029", "\x1c"])
def test_jsonl_strings_may_hold_unicode_line_separators(tmp_path, separator):
    from milora.io import read_records
    from milora.training.data import load_records

    records = [{"instruction": f"a{separator}b", "output": "c"}, {"instruction": "d", "output": f"e{separator}f"}]
    path = _jsonl(tmp_path / "data.jsonl", records)
    assert read_records(path) == records
    assert load_records(str(path)) == records
