"""Decode and prefill speed of the engine's variants, beside llama.cpp on the same GGUF.

Decode: ms per token after a 24-token prompt (median over the timed tokens). Prefill: ms to
process 24, 256 and 1024 prompt tokens into an empty cache (median of the repeats). Both go
through each engine's Python API without sampling. llama.cpp runs through llama-cpp-python
(the optional ``bench`` extra) with the same thread count; it is skipped when not importable.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

# name -> load_model keyword arguments
VARIANTS: dict[str, dict[str, Any]] = {
    "f32-dense": {"dtype": "float32", "weights": "dense", "compile": False},
    "bf16-dense": {"dtype": "bfloat16", "weights": "dense", "compile": False},
    "bf16-quant": {"dtype": "bfloat16", "weights": "quant", "compile": False},
    "bf16-quant-compiled": {"dtype": "bfloat16", "weights": "quant", "compile": True},
    "f32-dense-compiled": {"dtype": "float32", "weights": "dense", "compile": True},
    "default": {},
}
LLAMA_CPP = "llama.cpp"
PROMPT_TOKENS = 24
TEXT = (
    "The history of the lighthouse is a history of people who kept watch so that others could "
    "sleep. Every evening the keeper climbed the stairs, trimmed the wick, polished the lens and "
    "wrote the weather into the log: wind from the north-west, a heavy swell, three ships passed. "
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--model", default="smollm2")
    p.add_argument("--variants", default=",".join([*VARIANTS, LLAMA_CPP]),
                   help=f"comma-separated, from: {', '.join([*VARIANTS, LLAMA_CPP])}")
    p.add_argument("--threads", type=int, default=2, help="CPU threads (torch and llama.cpp)")
    p.add_argument("--decode-tokens", type=int, default=64)
    p.add_argument("--prefill-lengths", default="24,256,1024")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", dest="json_path", default=None,
                   help="where to write results (default benchmarks/results/decode-<device>-<date>.json)")


def _prompt(tokenizer: Any, n: int) -> list[int]:
    ids: list[int] = []
    while len(ids) < n:
        ids += tokenizer.encode(TEXT, add_bos=False)
    return ids[:n]


def _measure(prefill, decode, reset, ids: list[int], lengths: list[int], n_decode: int,
             repeats: int) -> dict[str, Any]:
    """Time prefill at each length and decode after PROMPT_TOKENS (all in ms)."""
    prefill_ms = {}
    for n in lengths:
        times = []
        for _ in range(repeats):
            reset()
            t = time.perf_counter()
            prefill(ids[:n])
            times.append((time.perf_counter() - t) * 1e3)
        prefill_ms[str(n)] = round(statistics.median(times), 2)
    steps = []
    for _ in range(repeats):
        reset()
        prefill(ids[:PROMPT_TOKENS])
        for i in range(n_decode):
            t = time.perf_counter()
            decode(ids[PROMPT_TOKENS + i])
            steps.append((time.perf_counter() - t) * 1e3)
    return {"decode_ms_per_token": round(statistics.median(steps), 3),
            "decode_ms_mean": round(statistics.fmean(steps), 3),
            "decode_ms_p90": round(statistics.quantiles(steps, n=10)[-1], 3),
            "prefill_ms": prefill_ms}


def _engine(name: str, args: argparse.Namespace, ids: list[int], lengths: list[int]) -> dict[str, Any]:
    from driftwood.model import load_model

    t = time.perf_counter()
    model = load_model(args.model, device=args.device, progress=False, **VARIANTS[name])
    load_s = time.perf_counter() - t
    session = model.new_session(capacity=max(lengths) + args.decode_tokens + PROMPT_TOKENS)
    t = time.perf_counter()  # warm-up, including any compilation
    session.prefill(ids[:PROMPT_TOKENS])
    for i in range(3):
        session.decode(ids[PROMPT_TOKENS + i])
    warmup_s = time.perf_counter() - t

    def sync() -> None:
        if model.device.type == "cuda":
            import torch

            torch.cuda.synchronize()

    result = _measure(lambda x: (session.prefill(x), sync()), lambda tok: (session.decode(tok), sync()),
                      session.reset, ids, lengths, args.decode_tokens, args.repeats)
    return {"variant": name, "dtype": str(model.dtype).removeprefix("torch."),
            "weights": model.weights, "compiled": model.compiled, "load_s": round(load_s, 2),
            "warmup_s": round(warmup_s, 2), **result}


def _llama_cpp(args: argparse.Namespace, ids: list[int], lengths: list[int]) -> dict[str, Any] | None:
    try:
        import llama_cpp
    except ImportError:
        from driftwood.bench.report import progress

        progress("llama.cpp: llama_cpp not importable, skipped (pip install 'driftwood[bench]')")
        return None
    from driftwood.model.registry import resolve

    t = time.perf_counter()
    llm = llama_cpp.Llama(str(resolve(args.model)), n_threads=args.threads,
                          n_threads_batch=args.threads, n_ctx=max(lengths) + args.decode_tokens + 64,
                          n_batch=max(lengths), n_gpu_layers=0, verbose=False)
    load_s = time.perf_counter() - t
    llm.eval(ids[:PROMPT_TOKENS])  # warm-up
    llm.reset()
    result = _measure(llm.eval, lambda tok: llm.eval([tok]), llm.reset, ids, lengths,
                      args.decode_tokens, args.repeats)
    return {"variant": LLAMA_CPP, "dtype": "ggml", "weights": "gguf", "compiled": None,
            "llama_cpp_python": llama_cpp.__version__, "load_s": round(load_s, 2), **result}


def run(args: argparse.Namespace) -> int:
    import os

    import torch

    from driftwood.bench.report import default_path, environment, format_table, progress, write_json

    torch.set_num_threads(args.threads)
    lengths = [int(x) for x in args.prefill_lengths.split(",")]
    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in names if v not in VARIANTS and v != LLAMA_CPP]
    if unknown:
        from driftwood.errors import DriftwoodError

        raise DriftwoodError(f"unknown variant(s) {', '.join(unknown)}")
    env = environment(args.device)
    env["load_average_start"] = [round(x, 2) for x in os.getloadavg()]
    from driftwood.model.gguf import GGUFFile
    from driftwood.model.registry import resolve
    from driftwood.model.tokenizer import Tokenizer

    with GGUFFile(resolve(args.model)) as f:
        ids = _prompt(Tokenizer.from_gguf(f.metadata), max(lengths) + PROMPT_TOKENS + args.decode_tokens)
    rows = []
    for name in names:
        if name == LLAMA_CPP:
            row = _llama_cpp(args, ids, lengths) if args.device == "cpu" else None
        else:
            row = _engine(name, args, ids, lengths)
        if row is not None:
            rows.append(row)
            progress(f"{name}: decode {row['decode_ms_per_token']:.2f} ms/token, prefill "
                     + ", ".join(f"{k}: {v:.0f} ms" for k, v in row["prefill_ms"].items()))

    flat = [{**r, **{f"prefill_{k}": v for k, v in r["prefill_ms"].items()}} for r in rows]
    print(format_table(flat, [("variant", "variant"), ("decode_ms_per_token", "decode ms/token"),
                              *[(f"prefill_{n}", f"prefill {n} ms") for n in lengths],
                              ("load_s", "load s"), ("warmup_s", "warm-up s")]))
    env["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    path = write_json({
        "benchmark": "decode", "environment": env, "model": args.model,
        "settings": {"threads": args.threads, "prompt_tokens": PROMPT_TOKENS,
                     "decode_tokens": args.decode_tokens, "prefill_lengths": lengths,
                     "repeats": args.repeats},
        "results": rows,
    }, args.json_path or default_path("decode", args.device, env))
    progress(f"wrote {path}")
    return 0
