"""Prompt templates, shared by training and evaluation so that the two cannot drift apart.

The paper trains and evaluates with Alpaca-style prompts (LLM-Adapters for commonsense,
MetaMath/PiSSA for math). Every template is assembled from the same pieces below; the math
evaluation prompt is the training prompt followed by the chain-of-thought cue.

- ``alpaca``: "### Instruction: ... ### Response:" (the "paired with an input" variant when a
  record has an input), the response on the next line;
- ``metamath``: the same header, ending in "### Response:" with the response appended directly;
- ``plain``: the instruction (and input after a blank line) and a newline;
- ``chat``: the tokenizer's chat template, instruction (+ input) as the user turn.

`eval_prompt` gives the evaluation prompts of the paper's benchmarks; `instruction_prompts`
those of the instruction-following benchmarks (IFEval, AlpacaEval).
"""

from __future__ import annotations

from dataclasses import dataclass

from milora.errors import DataError

_HEAD = "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
_HEAD_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
)
_INSTRUCTION = "### Instruction:\n{instruction}\n\n"
_INPUT = "### Input:\n{input}\n\n"
RESPONSE_HEADER = "### Response:"
MATH_COT_CUE = " Let's think step by step."
"""Appended to the math training prompt at evaluation (MetaMath/PiSSA protocol)."""
MATH_STOP_STRINGS = ("Question:", "Question", "USER:", "USER", "ASSISTANT:", "ASSISTANT",
                     "Instruction:", "Instruction", "Response:", "Response")
"""Stop strings of the MetaMath/PiSSA math evaluation used by the paper."""
COMMONSENSE_ANSWER_PREFIX = "the correct answer is"
"""How LLM-Adapters commonsense targets start ("the correct answer is answer2")."""


VQA_SHORT_ANSWER = "Answer the question using a single word or phrase."
"""LLaVA-1.5's instruction for short open answers (VQAv2, GQA, VizWiz, TextVQA, POPE)."""
MCQ_LETTER_ANSWER = "Answer with the option's letter from the given choices directly."
"""LLaVA-1.5's instruction for multiple choice with images (ScienceQA-IMG, MMBench)."""


def truncate_at_stop(text: str, stop_strings) -> str:
    """``text`` up to the first occurrence of any of ``stop_strings`` (the stop string itself dropped)."""
    cut = min((i for i in (text.find(s) for s in stop_strings) if i >= 0), default=len(text))
    return text[:cut]


def image_question(question: str, instruction: str = VQA_SHORT_ANSWER, images: int = 1) -> str:
    """A visual question as a LLaVA user turn: one ``<image>`` placeholder per image, the question, the
    answer-format instruction (training records and evaluation prompts are built alike)."""
    return "<image>" * images + ("\n" if images else "") + f"{question}\n{instruction}"


@dataclass(frozen=True)
class Template:
    """A named prompt template. ``prompt`` has an ``{instruction}`` field; ``prompt_with_input``
    also ``{input}`` (``None``: a non-empty input is appended to the instruction after a blank line).
    ``prompt is None`` means the tokenizer's chat template."""

    name: str
    description: str
    prompt: str | None
    prompt_with_input: str | None = None


TEMPLATES: dict[str, Template] = {
    "alpaca": Template(
        "alpaca",
        "The paper's Alpaca-style prompt (LLM-Adapters commonsense/instruction training), with the "
        "'paired with an input' variant when the record has an input.",
        _HEAD + _INSTRUCTION + RESPONSE_HEADER + "\n",
        _HEAD_WITH_INPUT + _INSTRUCTION + _INPUT + RESPONSE_HEADER + "\n",
    ),
    "metamath": Template(
        "metamath",
        "MetaMath/PiSSA math training prompt (the paper's math setting): Alpaca header, ending in "
        "'### Response:' with the response appended directly; evaluate with '### Response: Let's think step by step.'",
        _HEAD + _INSTRUCTION + RESPONSE_HEADER,
    ),
    "plain": Template(
        "plain",
        "No wrapper: the instruction (and input after a blank line), then a newline, then the response.",
        "{instruction}\n",
    ),
    "chat": Template(
        "chat",
        "The tokenizer's chat template: instruction (+ input) as the user turn, the output as the assistant "
        "turn; required for 'messages' records.",
        None,
    ),
}
TEMPLATE_NAMES = tuple(TEMPLATES)

CHAT_TEMPLATES = {
    # open-instruct's Tulu format, for base models (LLaMA-2) fine-tuned on Tulu-style conversations
    "tulu": (
        "{% for message in messages %}"
        "{% if message['role'] == 'system' %}{{ '<|system|>\n' + message['content'] + '\n' }}"
        "{% elif message['role'] == 'user' %}{{ '<|user|>\n' + message['content'] + '\n' }}"
        "{% elif message['role'] == 'assistant' %}{{ '<|assistant|>\n' + message['content'] + eos_token }}"
        "{% if not loop.last %}{{ '\n' }}{% endif %}{% endif %}"
        "{% if loop.last and add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
        "{% endfor %}"
    ),
}
"""Named chat templates for tokenizers without one (``chat_template`` in `milora train`, ``--chat-template``
in eval)."""


def join_input(instruction: str, input: str) -> str:
    """Instruction and input as one text (for templates without an input section)."""
    return f"{instruction}\n\n{input}" if input else instruction


def render_prompt(template: str, instruction: str, input: str = "", tokenizer=None) -> str:
    """The prompt text of an instruction record (what the model sees before its response).

    ``template="chat"`` needs the ``tokenizer`` (its chat template, with the generation prompt).
    """
    if template not in TEMPLATES:
        raise DataError(f"unknown template {template!r}: choose one of {', '.join(TEMPLATES)}.")
    spec = TEMPLATES[template]
    if spec.prompt is None:
        if tokenizer is None:
            raise DataError("template 'chat' renders with a tokenizer's chat template: pass the tokenizer.")
        return apply_chat_template(tokenizer, [{"role": "user", "content": join_input(instruction, input)}], True)
    if input and spec.prompt_with_input is not None:
        return spec.prompt_with_input.format(instruction=instruction, input=input)
    return spec.prompt.format(instruction=join_input(instruction, input))


def resolve_chat_template(value: str) -> str:
    """The Jinja text of a chat template given by name (`CHAT_TEMPLATES`) or as a ``.jinja`` file path."""
    if value in CHAT_TEMPLATES:
        return CHAT_TEMPLATES[value]
    from pathlib import Path

    path = Path(value)
    if not path.is_file():
        raise DataError(f"chat template {value!r} is neither one of {', '.join(CHAT_TEMPLATES)} nor an existing file.")
    return path.read_text(encoding="utf-8")


def apply_chat_template(tokenizer, messages: list[dict], generation_prompt: bool) -> str:
    """``messages`` rendered as text by the tokenizer's chat template (a clear error if it has none)."""
    if not getattr(tokenizer, "chat_template", None):
        raise DataError(
            "this tokenizer has no chat template, so 'messages' records and template 'chat' cannot be rendered: "
            "use instruction records with template alpaca, metamath or plain, or a model with a chat template."
        )
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def eval_prompt(task: str, instruction: str, input: str = "") -> str:
    """The paper's evaluation prompt: the Alpaca training prompt; for math (``gsm8k``, ``math``)
    its response header carries the chain-of-thought cue ("### Response: Let's think step by step.")."""
    prompt = render_prompt("alpaca", instruction, input)
    if task in ("gsm8k", "math"):
        # the training prompt up to its response header, then the cue instead of the newline
        prompt = prompt.removesuffix(RESPONSE_HEADER + "\n") + RESPONSE_HEADER + MATH_COT_CUE
    return prompt


def default_template(tokenizer) -> str:
    """``chat`` when the tokenizer has a chat template (chat and instruction-tuned models), else ``alpaca``
    (the paper's prompt for base models fine-tuned on Alpaca-style data)."""
    return "chat" if getattr(tokenizer, "chat_template", None) else "alpaca"


def instruction_prompts(tokenizer, instructions: list[str], template: str | None = None) -> tuple[list[str], str]:
    """The prompts of single-turn instructions, rendered as `milora train` renders them
    (``template``: one of `TEMPLATES`, default `default_template`); returns ``(prompts, template)``."""
    template = template or default_template(tokenizer)
    return [render_prompt(template, instruction, "", tokenizer) for instruction in instructions], template
