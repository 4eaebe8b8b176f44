"""The data of recipes/compare_demo.yaml: three one-digit terms added or subtracted (reasoning-gym's
`chain_sum`, e.g. "8 + 0 - 7 ="), in the LLM-Adapters math format that `milora eval --task gsm8k` scores.

- train.json: 800 problems (the sweep holds out 200 of them as its validation split);
- test.json: 200 other problems (no question text in common with train.json).
Training targets follow the MetaMath protocol the gsm8k task evaluates with: the training prompt
(template metamath) ends in "### Response:", the target starts with the evaluation's cue
" Let's think step by step.", works the sum left to right one operation at a time (a 135M model
learns one-digit steps within a few dozen optimizer steps, not three-term sums in one go) and ends
in "The answer is N.".

    python recipes/data/compare_demo/make_data.py     # rewrites both files (deterministic)
"""

import json
from pathlib import Path

import reasoning_gym

OPTIONS = {"min_terms": 3, "max_terms": 3, "min_digits": 1, "max_digits": 1}
HERE = Path(__file__).parent


def steps(expression: str) -> str:
    """" 8 + 0 = 8. 8 - 7 = 1." for "8 + 0 - 7 =": the sum worked left to right."""
    tokens = expression.rstrip("= ").split()
    total, text = int(tokens[0]), ""
    for operator, operand in zip(tokens[1::2], tokens[2::2], strict=True):
        result = total + int(operand) if operator == "+" else total - int(operand)
        text += f" {total} {operator} {operand} = {result}."
        total = result
    return text


def records(size: int, seed: int, exclude: set[str]) -> list[dict]:
    chosen, seen = [], set(exclude)
    for entry in reasoning_gym.create_dataset("chain_sum", size=4 * size, seed=seed, **OPTIONS):
        expression = entry["question"].rsplit(":", 1)[-1].strip()  # "8 + 0 - 7 ="
        if expression not in seen:
            seen.add(expression)
            answer = str(entry["answer"])
            chosen.append({"instruction": expression, "input": "", "answer": answer,
                           "output": f" Let's think step by step.{steps(expression)} The answer is {answer}."})
        if len(chosen) == size:
            return chosen
    raise RuntimeError("not enough distinct problems")


def main() -> None:
    test = records(200, seed=1, exclude=set())
    train = records(800, seed=0, exclude={record["instruction"] for record in test})
    for name, data in (("train.json", train), ("test.json", test)):
        (HERE / name).write_text(json.dumps(data, indent=0) + "\n")


if __name__ == "__main__":
    main()
