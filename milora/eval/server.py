"""Generation through an OpenAI-compatible server (vLLM, SGLang, llama.cpp's server): ``--server URL``.

milora renders every prompt itself, exactly as for local generation (same templates, same text),
and sends the text to the server's ``/v1/completions`` endpoint, one request per prompt, with at
most ``concurrency`` requests in flight. Decoding options map one to one: greedy is
``temperature=0``; sampling sends ``temperature``, ``top_p`` and a per-prompt ``seed`` (the run's
seed + the prompt's index, so repeated prompts give different samples); stop strings are sent as
``stop`` (at most four, `server_stop_strings`) and the text is cut at the first of all of them, as
locally; ``add_special_tokens`` is sent
only when the tokenizer's special tokens would change the prompt (vLLM's extension field).

`connect` checks the server before any item: it answers ``/v1/models``, serves the named model
or adapter (``--served-model``; with ``--adapter DIR`` and no name, the served adapter whose path
is DIR), and the base it serves matches the adapter's base and the local tokenizer's model
(`same_model`). `ServerModel.generate` checks that each prompt fits the server's context
(``max_model_len``, as vLLM reports it), retries timeouts, refused connections, 429 and 5xx
with exponential backoff (honouring ``Retry-After``), and treats a response with another number
of choices than asked or without a finish reason (a half-finished answer) as a failed attempt.
An item still failing after the retries fails the whole call with an error that counts and names
the failed items: a result is never silently shorter.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from milora.errors import ServerError
from milora.prompts import truncate_at_stop

MAX_STOP_STRINGS = 4  # the OpenAI API's limit on `stop`, which vLLM enforces
FINISHED = ("stop", "length")  # finish reasons of a complete answer (OpenAI, vLLM, SGLang, llama.cpp)
_SHOWN = 3


@dataclass(frozen=True)
class ServedEntry:
    """One entry of ``/v1/models``: ``root`` is the path or hub id the server loaded it from, ``parent``
    the base model's id for a LoRA adapter (vLLM), ``max_model_len`` the context in tokens (vLLM)."""

    id: str
    root: str | None = None
    parent: str | None = None
    max_model_len: int | None = None


@dataclass(frozen=True)
class Retry:
    """Attempts per request and the backoff: ``backoff_s * 2**k`` seconds before attempt k + 1 (a
    ``Retry-After`` header of a 429 / 503 wins when it asks for longer), ``timeout_s`` per attempt."""

    attempts: int = 5
    backoff_s: float = 1.0
    timeout_s: float = 600.0


class _Transient(Exception):
    """A failed attempt worth retrying: timeout, refused connection, 429, 5xx, a half-finished answer."""

    def __init__(self, reason: str, wait_s: float | None = None):
        super().__init__(reason)
        self.wait_s = wait_s


def base_url(url: str) -> str:
    """``http://host:8000``, ``.../v1`` or ``.../v1/`` -> ``http://host:8000/v1``."""
    if not url.startswith(("http://", "https://")):
        raise ServerError(f"--server takes an http(s) URL such as http://127.0.0.1:8000/v1 (got {url!r}).")
    url = url.rstrip("/")
    return url if url.endswith("/v1") else url + "/v1"


def _send(url: str, payload: dict | None, timeout_s: float) -> bytes:
    """One HTTP call (a GET without ``payload``, else a JSON POST); its body. Raises `_Transient` for what a
    retry may fix, `ServerError` else."""
    data = None if payload is None else json.dumps(payload).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            return response.read()
    except urllib.error.HTTPError as error:
        detail = error.read().decode(errors="replace")[:500]
        if error.code == 429 or error.code >= 500:
            after = error.headers.get("Retry-After")
            wait = float(after) if after and after.replace(".", "", 1).isdigit() else None
            raise _Transient(f"HTTP {error.code}: {detail}", wait) from None
        raise ServerError(f"{url} answered HTTP {error.code}: {detail}") from None
    except (urllib.error.URLError, TimeoutError, ConnectionError) as error:
        raise _Transient(f"{type(error).__name__}: {getattr(error, 'reason', error)}") from None


def _request(url: str, payload: dict | None, timeout_s: float) -> dict:
    """`_send` with a JSON answer; an answer that is not complete JSON is a `_Transient` failure."""
    body = _send(url, payload, timeout_s)
    try:
        return json.loads(body)
    except json.JSONDecodeError:
        raise _Transient(f"a response that is not complete JSON ({len(body)} bytes)") from None


def _with_retries(call, retry: Retry):
    for attempt in range(retry.attempts):
        try:
            return call()
        except _Transient as error:
            if attempt == retry.attempts - 1:
                raise ServerError(f"{error} (after {retry.attempts} attempts)") from None
            time.sleep(max(retry.backoff_s * 2 ** attempt, error.wait_s or 0.0))
    raise AssertionError("unreachable")


def list_models(url: str, retry: Retry = Retry(attempts=1, timeout_s=30.0)) -> list[ServedEntry]:
    """The entries of ``{url}/models``; an unreachable server or an unexpected answer is a `ServerError`."""
    try:
        answer = _with_retries(lambda: _request(f"{url}/models", None, retry.timeout_s), retry)
    except ServerError as error:
        raise ServerError(f"No OpenAI-compatible server answers at {url} ({error}). Start it first, e.g. "
                          "`python -m vllm.entrypoints.openai.api_server --model BASE --enable-lora "
                          "--lora-modules NAME=ADAPTER_DIR --max-lora-rank R` (see docs/serving.md).") from None
    entries = answer.get("data") if isinstance(answer, dict) else None
    if not isinstance(entries, list) or not all(isinstance(e, dict) and "id" in e for e in entries):
        raise ServerError(f"{url}/models did not answer an OpenAI model list (got {str(answer)[:200]}).")
    return [ServedEntry(str(e["id"]), e.get("root"), e.get("parent"), e.get("max_model_len")) for e in entries]


def same_model(served: str | None, local: str) -> bool:
    """Whether a path or hub id the server reports names the same model as ``local``: the same resolved
    directory when both exist here, else the same last path component (``/models/SmolLM2-135M`` and
    ``HuggingFaceTB/SmolLM2-135M``: a remote server's paths cannot be compared)."""
    if not served:
        return True  # the server does not say (SGLang, llama.cpp): nothing to compare
    there, here = Path(served).expanduser(), Path(local).expanduser()
    if there.exists() and here.exists():
        return there.resolve() == here.resolve()
    return there.name == here.name


def _served_names(entries: list[ServedEntry]) -> str:
    return ", ".join(f"{e.id} ({e.root})" if e.root and e.root != e.id else e.id for e in entries)


def _choose(entries: list[ServedEntry], url: str, served_model: str | None, adapter: str | None) -> ServedEntry:
    if served_model is not None:
        chosen = next((e for e in entries if e.id == served_model), None)
        base, colon, _ = served_model.rpartition(":")
        parent = next((e for e in entries if colon and e.id == base and e.parent is None), None)
        if chosen is None and parent is not None:  # SGLang names an adapter BASE:NAME and does not list it
            return ServedEntry(served_model, None, parent.id, parent.max_model_len)
        if chosen is None:
            raise ServerError(f"{url} does not serve {served_model!r}; it serves {_served_names(entries)}.")
        if adapter is not None and chosen.parent is not None and not same_model(chosen.root, adapter):
            raise ServerError(f"{served_model!r} on {url} is the adapter {chosen.root}, not --adapter {adapter}.")
        return chosen
    if adapter is not None:
        matches = [e for e in entries if e.parent is not None and e.root and same_model(e.root, adapter)]
        if len(matches) == 1:
            return matches[0]
        bases = [e.id for e in entries if e.parent is None] or ["BASE"]
        raise ServerError(
            f"{url} serves {'several adapters' if matches else 'no adapter'} from {adapter} "
            f"(it serves {_served_names(entries)}): name the one to use with --served-model NAME, or serve it with "
            f"`--enable-lora --lora-modules NAME={adapter} --max-lora-rank R` next to --model {bases[0]}.")
    bases = [e for e in entries if e.parent is None]
    if len(bases) != 1:
        raise ServerError(f"{url} serves {_served_names(entries)}: name the model to use with --served-model NAME.")
    return bases[0]


@dataclass
class ServerModel:
    """A served model (or adapter) that milora's generation tasks send their prompts to."""

    url: str  # ending in /v1
    name: str  # the model name sent with each request
    base: str | None  # the path or hub id of the base the server loaded, as it reports it
    max_model_len: int | None
    concurrency: int = 8
    retry: Retry = field(default_factory=Retry)

    def describe(self) -> dict:
        return {"server": self.url, "served_model": self.name, "server_base": self.base,
                "server_max_model_len": self.max_model_len, "concurrency": self.concurrency}

    def generate(self, tokenizer, prompts: list[str], *, max_new_tokens: int, stop_strings: tuple[str, ...] = (),
                 add_special_tokens: bool = True, temperature: float = 0.0, top_p: float = 1.0,
                 seed: int | None = None, progress: bool = True, desc: str = "generate") -> list[str]:
        """One completion per prompt, in the prompts' order (see the module docstring for the rules)."""
        from tqdm.auto import tqdm

        self._check_context(tokenizer, prompts, max_new_tokens, add_special_tokens)
        adds = tokenizer("x", add_special_tokens=True)["input_ids"] != tokenizer("x", add_special_tokens=False)[
            "input_ids"]
        payloads = []
        for index, prompt in enumerate(prompts):
            payload = {"model": self.name, "prompt": prompt, "max_tokens": max_new_tokens, "n": 1,
                       "temperature": temperature, "top_p": top_p if temperature > 0 else 1.0}
            if stop_strings:
                payload["stop"] = server_stop_strings(stop_strings)
            if temperature > 0 and seed is not None:
                payload["seed"] = seed + index
            if adds:
                payload["add_special_tokens"] = add_special_tokens
            payloads.append(payload)
        outputs: list[str | None] = [None] * len(prompts)
        failures: list[tuple[int, str]] = []
        with ThreadPoolExecutor(self.concurrency) as pool, tqdm(total=len(prompts), desc=desc,
                                                                disable=not progress) as bar:
            futures = {pool.submit(self._complete, payload): index for index, payload in enumerate(payloads)}
            for future, index in futures.items():
                try:
                    outputs[index] = truncate_at_stop(future.result(), stop_strings)
                except ServerError as error:
                    failures.append((index, str(error)))
                bar.update()
        if failures:
            shown = "; ".join(f"item {i}: {reason}" for i, reason in failures[:_SHOWN])
            raise ServerError(f"{len(failures)} of {len(prompts)} requests to {self.url} failed ({shown}"
                              f"{' ...' if len(failures) > _SHOWN else ''}); no results were written.")
        return outputs  # every item answered (a failure raised above)

    def _check_context(self, tokenizer, prompts, max_new_tokens: int, add_special_tokens: bool) -> None:
        if self.max_model_len is None:
            return  # the server does not say; it answers a too-long prompt with HTTP 400 (an error)
        lengths = [len(tokenizer(p, add_special_tokens=add_special_tokens)["input_ids"]) for p in prompts]
        over = [i for i, n in enumerate(lengths) if n + max_new_tokens > self.max_model_len]
        if over:
            longest = max(lengths)
            raise ServerError(
                f"{len(over)} of {len(prompts)} prompts do not fit the server's context of {self.max_model_len} "
                f"tokens with {max_new_tokens} new tokens (item {over[0]}: {lengths[over[0]]} prompt tokens; "
                f"longest {longest}). Restart the server with --max-model-len {longest + max_new_tokens} "
                "or more, or lower --max-new-tokens.")

    def _complete(self, payload: dict) -> str:
        def attempt() -> str:
            answer = _request(f"{self.url}/completions", payload, self.retry.timeout_s)
            choices = answer.get("choices") if isinstance(answer, dict) else None
            if not isinstance(choices, list) or len(choices) != payload["n"]:
                count = len(choices) if isinstance(choices, list) else 0
                raise _Transient(f"{count} choice(s) for n={payload['n']}")
            choice = choices[0]
            if not isinstance(choice.get("text"), str) or choice.get("finish_reason") not in FINISHED:
                raise _Transient(f"a half-finished answer (finish_reason {choice.get('finish_reason')!r})")
            return choice["text"]

        return _with_retries(attempt, self.retry)


def server_stop_strings(stop_strings) -> list[str]:
    """At most `MAX_STOP_STRINGS` stop strings for the server, the text being cut at all of them after.

    Stops that contain another stop are dropped (the other one cuts first: ``Question:`` after
    ``Question``); past the limit the rest only apply to the returned text. Greedy text before a stop
    does not depend on what follows it, so the cut text equals local generation's; the server may
    just generate further than needed (up to ``max_tokens``) when an unsent stop comes first.
    """
    unique = list(dict.fromkeys(stop_strings))
    needed = [stop for stop in unique if not any(other != stop and other in stop for other in unique)]
    return needed[:MAX_STOP_STRINGS]


@contextmanager
def runtime_adapter(url: str, name: str, directory: str, retry: Retry = Retry(attempts=3, timeout_s=600.0)):
    """``name`` loaded from ``directory`` into a running vLLM server for the ``with`` block, unloaded after
    (vLLM's run-time LoRA loading: start the server with ``VLLM_ALLOW_RUNTIME_LORA_UPDATING=True`` and
    ``--enable-lora --max-lora-rank R``, R >= the exported rank)."""
    root = base_url(url).removesuffix("/v1")
    payload = {"lora_name": name, "lora_path": str(Path(directory).resolve())}
    try:
        _with_retries(lambda: _send(f"{root}/v1/load_lora_adapter", payload, retry.timeout_s), retry)
    except ServerError as error:
        raise ServerError(f"{url} did not load the adapter {directory} ({error}): start vLLM with "
                          "VLLM_ALLOW_RUNTIME_LORA_UPDATING=True, --enable-lora and a --max-lora-rank of at least "
                          "the adapter's exported rank.") from None
    try:
        yield name
    finally:
        _with_retries(lambda: _send(f"{root}/v1/unload_lora_adapter", {"lora_name": name}, retry.timeout_s),
                      retry)


def connect(url: str, *, served_model: str | None = None, adapter: str | None = None,
            adapter_base: str | None = None, local_model: str | None = None, concurrency: int = 8,
            retry: Retry | None = None) -> ServerModel:
    """The `ServerModel` to generate with, after the up-front checks (see the module docstring).

    ``adapter``: the local adapter directory the served one must be; ``adapter_base``: the base that
    adapter was made for (its ``base_model_name_or_path``); ``local_model``: the model the local
    tokenizer comes from. Either base differing from the one the server loaded is a `ServerError`.
    """
    if isinstance(concurrency, bool) or not isinstance(concurrency, int) or concurrency < 1:
        raise ServerError(f"concurrency must be at least 1 (got {concurrency!r}).")
    url = base_url(url)
    entries = list_models(url)
    chosen = _choose(entries, url, served_model, adapter)
    base_entry = next((e for e in entries if e.id == chosen.parent), chosen) if chosen.parent else chosen
    base = base_entry.root or base_entry.id
    for what, expected in (("the adapter's base", adapter_base), ("--model (the tokenizer's model)", local_model)):
        if expected is not None and not same_model(base, expected):
            raise ServerError(f"{url} serves the base {base}, but {what} is {expected}: serve that base, or "
                              "point --model / --adapter at what the server holds.")
    return ServerModel(url, chosen.id, base, chosen.max_model_len or base_entry.max_model_len, concurrency,
                       retry or Retry())
