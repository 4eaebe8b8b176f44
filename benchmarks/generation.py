"""Items per second of `milora eval` generation: local transformers `generate` vs a vLLM-CPU server.

The same gsm8k items, the same prompts and greedy decoding (float32 both sides) on the embedded
SmolLM2-135M-Instruct, optionally with an adapter (``--adapter DIR``, served as a LoRA). Local
generation runs first (batch ``--batch-size``), then the vLLM server is started (its start-up time
reported apart, not counted in items/s) and the items go through ``--server`` with ``--concurrency``
requests in flight. Prints both rates (items/s and generated tokens/s), their ratio (vLLM / local) and
how many outputs are identical. The server starts with empty vLLM and torch-inductor compile caches (as
on a fresh CI machine; ``--reuse-compile-cache`` keeps ``~/.cache/vllm``), so its start-up time is the
cold one. vLLM's CPU worker binds its OpenMP threads to all cores but one, which it keeps for the API
server (on 2 cores: 1 computing core); ``--omp-bind 0-1`` sets ``VLLM_CPU_OMP_THREADS_BIND`` instead.

    python benchmarks/generation.py --vllm-python .venv-vllm/bin/python --items 30 --max-new-tokens 128
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from milora.eval import evaluate
from milora.eval.server import connect
from milora.eval.vllm_process import VllmServer
from milora.models import embedded_model_dir, load_base_model

SHARED_GSM8K = Path("/work/shared/data/math/gsm8k_test.jsonl")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--vllm-python", default=".venv-vllm/bin/python", help="the vLLM environment's python")
    parser.add_argument("--data", type=Path, default=SHARED_GSM8K, help="gsm8k JSONL")
    parser.add_argument("--items", type=int, default=30)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=8, help="local generation batch")
    parser.add_argument("--concurrency", type=int, default=8, help="requests in flight to the server")
    parser.add_argument("--adapter", default=None, help="an adapter directory (default: the base model alone)")
    parser.add_argument("--kv-cache-gib", default="2", help="VLLM_CPU_KVCACHE_SPACE")
    parser.add_argument("--omp-bind", default=None, help="VLLM_CPU_OMP_THREADS_BIND (default: vLLM's auto)")
    parser.add_argument("--reuse-compile-cache", action="store_true", help="keep vLLM's compile cache (warm start)")
    args = parser.parse_args()
    options = {"limit": args.items, "max_new_tokens": args.max_new_tokens, "progress": False}

    model, tokenizer = load_base_model(None)
    if args.adapter:
        from milora.adapter.load import load_model

        model = load_model(model, args.adapter)
    evaluate(model, tokenizer, "gsm8k", args.data, limit=2, max_new_tokens=8, progress=False)  # warm-up, as below
    start = time.perf_counter()
    local = evaluate(model, tokenizer, "gsm8k", args.data, batch_size=args.batch_size, **options)
    local_s = time.perf_counter() - start
    del model

    adapters = {"tuned": args.adapter} if args.adapter else {}
    with tempfile.TemporaryDirectory() as scratch:
        env = {"VLLM_CPU_KVCACHE_SPACE": args.kv_cache_gib, **({"VLLM_CPU_OMP_THREADS_BIND": args.omp_bind}
                                                             if args.omp_bind else {})}
        if not args.reuse_compile_cache:
            env |= {"VLLM_CACHE_ROOT": f"{scratch}/vllm-cache", "TORCHINDUCTOR_CACHE_DIR": f"{scratch}/inductor"}
        with VllmServer(args.vllm_python, str(embedded_model_dir()), Path(scratch) / "vllm.log", adapters=adapters,
                        extra=["--dtype", "float32", "--max-model-len", "2048"], env=env) as server:
            served = connect(server.url, served_model="tuned" if args.adapter else None,
                             concurrency=args.concurrency)
            evaluate(served, tokenizer, "gsm8k", args.data, limit=2, max_new_tokens=8, progress=False)  # warm-up
            start = time.perf_counter()
            remote = evaluate(served, tokenizer, "gsm8k", args.data, **options)
            remote_s = time.perf_counter() - start
    items = len(local["items"])
    same = sum(a["output"] == b["output"] for a, b in zip(local["items"], remote["items"], strict=True))

    def tokens(result: dict) -> int:
        return sum(len(tokenizer(i["output"], add_special_tokens=False)["input_ids"]) for i in result["items"])

    print(f"{items} gsm8k items, up to {args.max_new_tokens} new tokens, greedy, float32, "
          f"{'adapter ' + args.adapter if args.adapter else 'base model'}")
    for label, seconds, result in ((f"local transformers generate (batch {args.batch_size})", local_s, local),
                                   (f"vLLM-CPU server (concurrency {args.concurrency})", remote_s, remote)):
        print(f"{label:<40} {seconds:7.1f} s, {items / seconds:.3f} items/s, {tokens(result) / seconds:6.1f} "
              f"output tokens/s ({tokens(result)} tokens)")
    print(f"vLLM server start: {server.started_s:.0f} s ({'warm' if args.reuse_compile_cache else 'empty'} "
          f"compile cache; not counted above); OpenMP binding {args.omp_bind or 'auto'}")
    print(f"ratio vLLM / local, items/s: {local_s / remote_s:.2f}x; identical outputs: {same} of {items}")


if __name__ == "__main__":
    main()
