"""Decode and prefill speed of the engine's variants, beside llama.cpp on the same GGUF.

On CUDA (``--device cuda``, :func:`run_cuda`) ``--model`` takes a comma-separated
list of GGUF files and the measures are those of docs/gpu.md.

Decode: ms per token after a 24-token prompt (median over every timed token of every round).
Prefill: ms to process 24, 256 and 1024 prompt tokens into an empty cache (median of the
rounds). Every engine runs through its Python API, without sampling. All variants are loaded
first and measured round-robin, so they share the machine's conditions. llama.cpp runs
through llama-cpp-python (the optional ``bench`` extra) with the same thread count, and is
skipped when it is not importable.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import time
from collections.abc import Callable
from typing import Any

# name -> load_model keyword arguments
VARIANTS: dict[str, dict[str, Any]] = {
    "f32-dense": {"dtype": "float32", "weights": "dense"},
    "bf16-dense": {"dtype": "bfloat16", "weights": "dense"},
    "bf16-quant": {"dtype": "bfloat16", "weights": "quant"},
    "bf16-hybrid": {"dtype": "bfloat16", "weights": "hybrid"},
    "bf16-hybrid-compiled": {"dtype": "bfloat16", "weights": "hybrid", "compile": True},
    # the same with torch's int4/int8 weight-only kernels instead of driftwood.model.cpu's
    "bf16-hybrid-torch": {"dtype": "bfloat16", "weights": "hybrid", "native": False},
    "bf16-hybrid-torch-compiled": {"dtype": "bfloat16", "weights": "hybrid", "compile": True,
                                   "native": False},
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
    p.add_argument("--model", default="smollm2", help="model name or GGUF path (default smollm2)")
    p.add_argument("--variants", default=",".join([*VARIANTS, LLAMA_CPP]),
                   help=f"comma-separated, from: {', '.join([*VARIANTS, LLAMA_CPP])}")
    p.add_argument("--threads", type=int, default=2, help="CPU threads, torch and llama.cpp (default 2)")
    p.add_argument("--decode-tokens", type=int, default=64, help="timed tokens per round (default 64)")
    p.add_argument("--prefill-lengths", default="24,256,1024")
    p.add_argument("--rounds", type=int, default=3, help="round-robin rounds (default 3)")
    p.add_argument("--json", dest="json_path", default=None, help="where to write the JSON result")
    p.add_argument("--batches", default="1,8,32,64", help="cuda: batch sizes for aggregate tokens/s")
    p.add_argument("--peer", action=argparse.BooleanOptionalAction, default=True,
                   help="cuda: time transformers' eager generate on the same weights (default on)")


class _Runner:
    """One variant: prefill(ids), decode(token), reset(), plus what it reports."""

    def __init__(self, name: str, prefill: Callable, decode: Callable, reset: Callable,
                 info: dict[str, Any]) -> None:
        self.name, self.prefill, self.decode, self.reset, self.info = name, prefill, decode, reset, info
        self.prefill_ms: dict[int, list[float]] = {}
        self.decode_ms: list[float] = []

    def round(self, ids: list[int], lengths: list[int], n_decode: int) -> None:
        for n in lengths:
            self.reset()
            t = time.perf_counter()
            self.prefill(ids[:n])
            self.prefill_ms.setdefault(n, []).append((time.perf_counter() - t) * 1e3)
        self.reset()
        self.prefill(ids[:PROMPT_TOKENS])
        for i in range(n_decode):
            t = time.perf_counter()
            self.decode(ids[PROMPT_TOKENS + i])
            self.decode_ms.append((time.perf_counter() - t) * 1e3)

    def result(self) -> dict[str, Any]:
        d = self.decode_ms
        return {"variant": self.name, **self.info,
                "decode_ms_per_token": round(statistics.median(d), 3),
                "decode_ms_mean": round(statistics.fmean(d), 3),
                "decode_ms_p10": round(statistics.quantiles(d, n=10)[0], 3),
                "decode_ms_p90": round(statistics.quantiles(d, n=10)[-1], 3),
                "prefill_ms": {str(n): round(statistics.median(v), 1) for n, v in self.prefill_ms.items()},
                "prefill_ms_all": {str(n): [round(x, 1) for x in v] for n, v in self.prefill_ms.items()}}


def _engine(name: str, args: argparse.Namespace, ids: list[int], capacity: int) -> _Runner:
    import torch

    from driftwood.model import cpu, load_model

    t = time.perf_counter()
    kw = dict(VARIANTS[name])
    with contextlib.nullcontext() if kw.pop("native", True) else cpu.disabled():
        model = load_model(args.model, device=args.device, progress=False, **kw)
    load_s = time.perf_counter() - t
    session = model.new_session(capacity=capacity)
    sync = torch.cuda.synchronize if model.device.type == "cuda" else (lambda: None)
    t = time.perf_counter()  # warm-up, including any compilation
    session.prefill(ids[:PROMPT_TOKENS])
    for i in range(3):
        session.decode(ids[PROMPT_TOKENS + i])
    sync()
    warmup_s = time.perf_counter() - t
    info = {"dtype": str(model.dtype).removeprefix("torch."), "weights": model.weights,
            "compiled": model.compiled, "load_s": round(load_s, 2), "warmup_s": round(warmup_s, 2)}
    return _Runner(name, lambda x: (session.prefill(x), sync()), lambda tok: (session.decode(tok), sync()),
                   session.reset, info)


def _llama_cpp(args: argparse.Namespace, ids: list[int], capacity: int) -> _Runner | None:
    from driftwood.bench.report import progress

    try:
        import llama_cpp
    except ImportError:
        progress("llama.cpp: llama_cpp is not importable, skipped (pip install 'driftwood[bench]')")
        return None
    from driftwood.model.registry import resolve

    t = time.perf_counter()
    llm = llama_cpp.Llama(str(resolve(args.model)), n_threads=args.threads, n_threads_batch=args.threads,
                          n_ctx=capacity, n_batch=capacity, n_gpu_layers=0, verbose=False)
    load_s = time.perf_counter() - t
    llm.eval(ids[:PROMPT_TOKENS])  # warm-up
    llm.reset()
    info = {"dtype": "ggml", "weights": "gguf", "compiled": None, "load_s": round(load_s, 2),
            "llama_cpp_python": llama_cpp.__version__}
    return _Runner(LLAMA_CPP, llm.eval, lambda tok: llm.eval([tok]), llm.reset, info)


def run(args: argparse.Namespace) -> int:
    if args.device.startswith("cuda"):
        return run_cuda(args)
    import torch

    from driftwood.bench.report import default_path, environment, format_table, progress, write_json
    from driftwood.errors import DriftwoodError
    from driftwood.model.gguf import GGUFFile
    from driftwood.model.registry import resolve
    from driftwood.model.tokenizer import Tokenizer

    torch.set_num_threads(args.threads)
    lengths = [int(x) for x in args.prefill_lengths.split(",")]
    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in names if v not in VARIANTS and v != LLAMA_CPP]
    if unknown:
        raise DriftwoodError(f"unknown variant(s): {', '.join(unknown)}")
    env = environment(args.device)
    env["load_average_start"] = [round(x, 2) for x in os.getloadavg()]
    need = max(lengths) + PROMPT_TOKENS + args.decode_tokens
    capacity = need + 16
    with GGUFFile(resolve(args.model)) as f:
        tokenizer = Tokenizer.from_gguf(f.metadata)
    ids: list[int] = []
    while len(ids) < need:
        ids += tokenizer.encode(TEXT, add_bos=False)

    runners = []
    for name in names:
        progress(f"loading {name}")
        if name == LLAMA_CPP:
            runner = _llama_cpp(args, ids, capacity) if args.device == "cpu" else None
        else:
            runner = _engine(name, args, ids, capacity)
        if runner is not None:
            runners.append(runner)
    for r in range(args.rounds):
        for runner in runners:
            runner.round(ids, lengths, args.decode_tokens)
            progress(f"round {r + 1}/{args.rounds} {runner.name}: decode "
                     f"{statistics.median(runner.decode_ms[-args.decode_tokens:]):.2f} ms/token")
    rows = [runner.result() for runner in runners]

    flat = [{**r, **{f"prefill_{k}": v for k, v in r["prefill_ms"].items()}} for r in rows]
    print(format_table(flat, [("variant", "variant"), ("decode_ms_per_token", "decode ms/token"),
                              *[(f"prefill_{n}", f"prefill {n} ms") for n in lengths],
                              ("load_s", "load s"), ("warmup_s", "warm-up s")]))
    env["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    path = write_json({
        "benchmark": "decode", "environment": env, "model": args.model,
        "settings": {"threads": args.threads, "prompt_tokens": PROMPT_TOKENS,
                     "decode_tokens_per_round": args.decode_tokens, "prefill_lengths": lengths,
                     "rounds": args.rounds},
        "results": rows,
    }, args.json_path or default_path("decode", args.device, env))
    progress(f"wrote {path}")
    return 0


# ---- CUDA: the GPU fast path against the eager paths and transformers (docs/gpu.md) ----

# name -> (load_model keyword arguments, how the one-token step runs, prediction written
# before the first measurement on the H100)
CUDA_VARIANTS: dict[str, tuple[dict[str, Any], dict[str, Any], str]] = {
    "graphs": ({}, {}, "2026-11-23, fourteenth pass: attention in one kernel that runs only the splits holding "
               "keys (a single one, as at every context up to 192 positions in the benchmark's 4,160-position cache, "
               "writes the output itself; more are combined by the last to finish) instead of every split and then "
               "the combine kernel (graphs-two-kernel-attention): batch 1 ~-25 us a token (16 combine kernels of "
               "~1.5 us and their boundaries), Q4_0 ~0.57-0.59 ms, BF16 ~1.01, Q8_0 ~0.77; batch 64 ~-30 us a step. "
               "And a one-row step's token and position written by two stream memory operations instead of a host "
               "tensor and its copy (graphs-copied-inputs): ~-5-10 us a synchronized token, the streamed unchanged. "
               "Then Q4_0's one-row gate|up and head with blocks that loop over tiles, x staged once a block and the "
               "next tile's weights in flight (graphs-before-loop; per product 10.4 against 11.4 us and 63.0 against "
               "Triton's 64.9 in scripts/gpu/cuda_gemv_sweep.py): Q4_0 batch 1 ~-18 us a token. Then qkv, o and down "
               "at 8, 32 and 64 rows through the mma kernel with the groups split among blocks (graphs-before-splits; "
               "the sweep's products a step, 16 layers: Q4_0 8 rows 800 -> 509 us, 32: 762 -> 546, 64: 785 -> 752; "
               "Q8_0 779 -> 480, 804 -> 620, 762 -> 745): batch 8 ~+25% tok/s, batch 32 ~+15%, batch 64 ~+2%. "
               "Thirteenth pass: Q4_0 and Q8_0 products of 5-64 rows through int8 mma.sync "
               "kernels in CUDA C++ (driftwood.model.cuda.mma: x quantized per group into the A fragments' order by "
               "its own kernel with RMSNorm or SiLU-up inside, the weights' B fragments taken from one word a lane, "
               "x's fragments of 8 groups staged in shared memory for every warp of a block) in place of the Triton "
               "int8 dots and dequantize + cuBLAS (graphs-before-mma), first with one configuration a shape (the "
               "head 8 warps x 2 tiles, gate_up 4 x 2, the others 2 x 1): batch 64 Q4_0 ~1.2 ms a step (~53k tok/s, "
               "~30x batch 1), Q8_0 ~1.3 ms (~49k); batch 32 Q4_0 ~34k tok/s; batch 8 ~10k; batch 1 unchanged. "
               "Measured (experiment-decode-cuda-2026-11-23-mma-first.json): Q4_0 batch 64 18.6k tok/s against "
               "31.2k before: the mma kernel is slower than dequantize + cuBLAS for qkv, o and down (29, 26, 94 "
               "against 12, 10, 27 us at 64 rows), faster for gate_up and the head. Final: mma only where the sweep "
               "(MMA=1 scripts/gpu/int8_sweep.py) measured it faster (the head and gate_up; Q8_0's small ones at "
               "8-16 rows): Q4_0 batch 64 ~-300 us a step (~36k tok/s, ~20.5x), batch 32 ~21k, batch 8 ~5.6k; Q8_0 "
               "batch 64 ~37k, 32 ~21k, 8 ~5.7k; and "
               "the token embeddings gathered and dequantized in one CUDA kernel instead of torch's 3 (BF16) to 11 "
               "(Q4_0) (graphs-torch-embed): batch 1 Q4_0 ~-15 us a token, Q8_0 ~-8, BF16 ~-4. Twelfth pass: BF16's one-row products through a CUDA C++ kernel (NVRTC), "
               "launched with PDL, per-shape configurations from scripts/gpu/cuda_gemv_sweep.py: on the machine "
               "that measured the Triton step at 1.24 and this kernel with PDL and one configuration at 1.14 "
               "ms/token, ~1.115 (down's configuration -1.5 us a layer); the quantized files unchanged. Measured: "
               "BF16 1.058 against 1.220 for the Triton kernel in the same run. Then Q4_0's qkv, o, gate_up and down "
               "through the CUDA kernel's quantized variant (the head and Q8_0 stay on Triton): Q4_0 ~-33 us a "
               "token (0.666 against 0.699 in the run that tried it for both formats), the rest unchanged. Measured: "
               "Q4_0 0.675 against 0.694 (graphs-triton-quant) in the same run. Then attention's kernels with PDL "
               "(graphs-no-pdl-attention): Q4_0 ~0.64, BF16 ~1.05, Q8_0 ~0.83. Eighth pass: int8 activations (per 32-column group, as llama.cpp's Q8_1): at "
               "5-64 rows the wide products and the head (and Q8_0's down) as int8 tensor-core dots on the stored codes, "
               "at batch 1 Q4_0's qkv, o and gate_up through dp4a (scripts/gpu/int8_sweep.py): batch 64 Q8_0 ~2.15 ms a "
               "step (~30k tok/s, ~23x batch 1), Q4_0 ~2.4 ms (~26.5k, ~17.5x); batch 32 Q4_0 ~16.8k, Q8_0 ~17.3k; "
               "batch 8 Q4_0 ~4.9k, Q8_0 ~5.0k; batch 1 Q4_0 ~-30 us (~0.68 ms), Q8_0 and BF16 unchanged. Measured (first run): batch 64 Q8_0 34.2k tok/s (26.3x), Q4_0 29.4k (19.3x); batch 32 17.6k / 17.0k; batch 8 5.1k / 4.8k; batch 1 Q4_0 0.692 ms. Then (final run) Q4_0's codes made signed before the int8 dots (the offset term gone from the epilogue; faster at 8-32 rows, equal at 64 in the sweeps), and BF16 batches with SiLU · up in one kernel and the residual added in cuBLAS's epilogue (addmm): batch 32 Q4_0 ~18k tok/s, batch 8 ~4.9k; BF16 batch 64 ~-140 us a step (~42k tok/s); the rest unchanged. Measured (second run): batch 64 Q4_0 30.0k (19.6x), Q8_0 34.8k (26.8x), BF16 40.8k; batch 32 Q4_0 18.0k; batch 8 4.9k. Then gate_up at 64 rows in two splits (the sweep: Q4_0 -2.6 us a layer, Q8_0 -1.0): Q4_0 batch 64 ~30.7k tok/s (~20x), Q8_0 ~35k. Seventh pass: silu(gate) * up in one kernel where the down product is "
               "dequantize + cuBLAS (17-64 rows; 16 fewer kernels and one rounding less a step): batch 64 ~-60 us a "
               "step (Q4_0 ~25k tok/s, Q8_0 ~23.5k); batch 1 unchanged. Sixth pass: the dequantizer 2.2x faster (a group's words in one vector load, "
               "positions permuted in registers: 2.3-2.8 TB/s) and the 5-64-row configurations chosen from a "
               "sweep timed in CUDA graphs (dequantize + cuBLAS for nearly everything at 17-64 rows): batch 64 "
               "Q4_0 ~2.3 ms a step (~28k tok/s, ~19x batch 1), Q8_0 ~2.5 ms (~26k, ~21x); batch 32 Q4_0 ~2.15 ms "
               "(~15k tok/s); batch 8 Q4_0 ~1.9 ms (~4.2k tok/s); quantized prefill at 512 tokens ~-4 ms. Measured "
               "(first run, a slower host): batch 64 Q4_0 24.4k tok/s (16.6x), Q8_0 23.0k (19.0x); batch 32 13.4k / "
               "12.4k; batch 8 3.9k / 3.6k. Then batch-1 configurations from the sweeps timed in graphs (the earlier "
               "sweeps, timed from Python, measured launch overhead for products under ~20 us), with RMSNorm inside as "
               "decode runs them: Q4_0 ~-55 us a token, Q8_0 ~-28 us, BF16 ~-38 us. Fifth pass: Q4_0/Q8_0 dequantizer with coalesced stores and the joined-tile "
               "tl.dot (dotj) for wide matrices at 5-16 rows: batch 8/32/64 quantized -10-20% a step, batch 1 "
               "unchanged. Fourth pass: BF16's one-row dense GEMV configured per matrix shape from "
               "scripts/gpu/dense_sweep.py (qkv, o, down -0.4, -0.8, -1.0 us each in isolation): BF16 ~-30 us a "
               "token (~1.23 ms against the third pass's 1.258); quantized files unchanged. Third pass: RoPE and the KV-cache write in the QKV GEMV's epilogue "
               "(16 fewer kernels a token at batch 1, up to 16 rows for Q4_0/Q8_0): ~-50 us a token, Q4_0 ~0.73, "
               "Q8_0 ~0.88, BF16 ~1.29 ms; batches unchanged. Second pass, final version: batch 1 gemvT (Q4_0 ~0.78 ms, Q8_0 ~0.93, BF16 ~1.35); "
               "batches: per matrix shape the fastest measured of gemvT per row, the per-slot tl.dot "
               "kernel and dequantize + cuBLAS (sweep sums x 0.78, the graph-to-sweep ratio of the 4th "
               "version): Q4_0 batch 64 ~3.5 ms a step (~18k tok/s, ~14x batch 1), batch 8 ~1.5 ms "
               "(~5.5k tok/s); Q8_0 batch 64 ~3.0 ms (~21k tok/s, ~19x). "
               "4th version: batch 1 as the 3rd (gemvT); 2-4 rows the gemvT kernel per row "
               "(L2 serves the repeats); 5-64 rows dequantize to bfloat16 in 16 MB chunks that stay in L2, "
               "each through cuBLAS: Q4_0 batch 64 ~1.2 ms a step (~53k tok/s, >= 20x batch 1), batch 8 "
               "~1.1 ms; batch 1 unchanged (Q4_0 0.77, Q8_0 0.92, BF16 1.35); measured: batch 64 10.8k tok/s "
               "(Q4_0, 5.9 ms a step), 14.7k (Q8_0): 16 MB chunks made cuBLAS slower, and the Q4_0 "
               "dequantizer is slow (8-byte scattered stores). "
               "3rd version predicted Q4_0 ~0.75 / Q8_0 ~1.0 ms at batch 1, measured 0.774 / 0.920; "
               "its gathered-tile tl.dot ('dotg') for batches, predicted ~1 ms a step at 64 rows, ran at "
               "25-110 GB/s (batch 64: 2.5k tok/s, worse than before). 2nd version (per-slot 2-D GEMV, "
               "per-slot K=16 dots) predicted Q4_0 ~0.62, measured 0.93; Q8_0 ~0.83, measured 1.18; "
               "batch 64 >= 20x, measured 4.3x (Q4_0). 1st pass: Q4_0 ~0.45 ms, BF16 ~1.05 ms, batch 64 "
               "~30x batch 1"),
    "graphs-before-splits": ({}, {"mma_splits": False}, "fourteenth pass: qkv, o and down at 5-64 rows as before "
                             "the mma kernel split the groups among blocks (dequantize + cuBLAS, Triton int8 dots, "
                             "mma without splits), for comparison with graphs in the same run"),
    "graphs-before-loop": ({}, {"cuda_loop": False}, "fourteenth pass: Q4_0's one-row gate|up without looping "
                           "blocks (8 warps x 4 rows, two waves) and the head on Triton, for comparison with graphs "
                           "in the same run"),
    "graphs-copied-inputs": ({}, {"write_values": False}, "fourteenth pass: a one-row step's token and position "
                             "copied from a host tensor (the thirteenth pass's GraphDecoder) instead of written by "
                             "two cuStreamWriteValue64 operations, for comparison with graphs in the same run"),
    "graphs-two-kernel-attention": ({}, {"adaptive_attention": False}, "fourteenth pass: attention as every "
                                    "split of the sequence, then the combine kernel (the thirteenth pass's step), "
                                    "for comparison with graphs in the same run"),
    "graphs-before-mma": ({}, {"mma": False}, "thirteenth pass: 5-64-row quantized products as before the mma "
                          "kernels (Triton int8 dots, dequantize + cuBLAS), for comparison with graphs in the same run"),
    "graphs-torch-embed": ({}, {"cuda_embed": False}, "thirteenth pass: the token embeddings through torch's "
                           "gather and dequantizing ops (the twelfth pass's step), for comparison with graphs"),
    "graphs-triton-gemv": ({}, {"cuda_gemv": False}, "twelfth pass: BF16's one-row products through the Triton "
                           "kernel (the eleventh pass's step), for comparison with graphs in the same run"),
    "graphs-cuda-gemv-no-pdl": ({}, {"cuda_pdl": False}, "twelfth pass: the CUDA C++ one-row kernel launched "
                                "without PDL: measured first (default configuration) BF16 1.21 against 1.24 "
                                "ms/token for the Triton kernel and 1.14 with PDL"),
    "graphs-triton-quant": ({}, {"cuda_quant": False}, "twelfth pass: Q4_0's one-row products through the Triton "
                            "kernels (the eleventh pass's step), for comparison with graphs in the same run"),
    "graphs-no-pdl-attention": ({}, {"pdl_attention": False}, "twelfth pass: attention's kernels launched without "
                                "PDL (the step before graphs' last kernel change; predicted for that change: the CUDA o "
                                "product's weights requested while attention ends, Q4_0 ~-30 us a token, BF16 ~-5, Q8_0 "
                                "unchanged; measured in a first run (experiment-decode-cuda-2026-11-22-pdl-attention.json) "
                                "Q4_0 0.639 against 0.665 ms/token, BF16 1.057 / 1.053, Q8_0 0.829 / 0.842)"),
    "graphs-triton-dense": ({"weights": "dense"}, {"dense": "triton"},
                            "BF16 only: the Triton GEMV on dense weights, within 10% of cuBLAS"),
    "graphs-unfused-norm": ({}, {"fuse_norm": False}, "RMSNorm as its own kernel before the QKV, gate|up "
                            "and head products (33 more kernels a step at batch 1): ~+80 us a token "
                            "(~2.5 us a kernel in a graph)"),
    "graphs-unfused-rope": ({}, {"fuse_rope": False}, "third pass: RoPE and the cache write as their own "
                           "kernel after the QKV product (the second pass's step; 16 more kernels a token): "
                           "~+50 us a token (~3 us a small kernel in a graph)"),
    "graphs-fused-combine": ({}, {"fuse_combine": True}, "fourth pass: attention's split partials combined "
                             "by the last split program of each KV head (an acq_rel counter) instead of a "
                             "second kernel, 16 fewer kernels a token: ~-45 us a token, BF16 ~1.21, Q4_0 "
                             "~0.67, Q8_0 ~0.83 ms. Measured (2026-11-22, same run as the split step): "
                             "+15 to +40 us a token (p10 BF16 1.263 vs 1.226, Q4_0 0.733 vs 0.717, Q8_0 "
                             "0.899 vs 0.865): the serial combine at the kernel's tail costs more than the "
                             "launch it saves"),
    "graphs-pdl": ({}, {"pdl": True}, "twelfth pass (the CUDA one-row kernel already launched with PDL): the "
                   "Triton kernels (attention's split and combine) launched with it too, so the o product's weights "
                   "are requested while attention ends: ~-1 us at 2 boundaries a layer, BF16 ~-30 us a token. Third "
                   "pass: every Triton kernel of the step launched with programmatic "
                   "dependent launch, the GEMVs loading their weights before waiting on the previous kernel: "
                   "~-1.5 us a kernel boundary (~100 a token) on top of the fused RoPE: Q4_0 ~0.58, Q8_0 ~0.74, "
                   "BF16 ~1.14 ms"),
    "fused-eager": ({}, {"capture": False}, "the same kernels launched from Python: ~+1 ms of "
                    "launch overhead (~150 launches at ~7 us)"),
    "torch-eager": ({"graphs": False, "weights": "dense"}, {}, "the eager torch path on dense "
                    "weights: ~400 small ops, launch-bound at ~8-15 ms/token"),
}


def _sync() -> None:
    import torch

    torch.cuda.synchronize()


def copy_bandwidth(nbytes: int = 1 << 30, repeats: int = 20) -> float:
    """Device-to-device copy bandwidth in GB/s, counting bytes read plus bytes written."""
    import torch

    src = torch.randint(0, 255, (nbytes,), dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    times = []
    for _ in range(repeats + 3):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        dst.copy_(src)
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return 2 * nbytes / (statistics.median(times[3:]) * 1e-3) / 1e9


def decode_weight_bytes(model) -> int:
    """Bytes a batch-1 step reads of the weights: every layer's matrices and norms, the final
    norm and the head (of the embedding table only one row)."""
    t = model.transformer
    mods = [*t.layers, t.output]
    total = sum(x.numel() * x.element_size() for m in mods for x in [*m.parameters(), *m.buffers()])
    return total + t.norm.numel() * t.norm.element_size()


def _time_ms(fn: Callable[[], Any]) -> float:
    _sync()
    t = time.perf_counter()
    fn()
    _sync()
    return (time.perf_counter() - t) * 1e3


def _cuda_variant(path: str, name: str, args: argparse.Namespace, ids: list[int], lengths: list[int],
                  batches: list[int]) -> dict[str, Any]:
    import torch

    from driftwood.model import load_model
    from driftwood.model.cuda.decoder import TritonOps

    load_kw, step_kw, prediction = CUDA_VARIANTS[name]
    t = time.perf_counter()
    model = load_model(path, device="cuda", dtype="bfloat16", progress=False, **load_kw)
    ops_kw = {k: v for k, v in step_kw.items() if k not in ("capture", "write_values")}  # TritonOps' options
    if ops_kw:
        model.decode_ops = TritonOps(**ops_kw)
    if step_kw.get("capture") is False:
        model.graph_capture = False
    if step_kw.get("write_values") is False:
        model.graph_write_values = False
    row: dict[str, Any] = {"variant": name, "file": os.path.basename(path), "weights": model.weights,
                           "graphs": model.graphs, "capture": model.graph_capture,
                           "load_s": round(time.perf_counter() - t, 2), "prediction": prediction,
                           "weight_bytes_per_step": decode_weight_bytes(model)}
    n = args.decode_tokens
    cap = max(lengths) + PROMPT_TOKENS + n + 16
    with torch.inference_mode():
        s = model.new_session(capacity=cap)
        t = time.perf_counter()
        s.prefill(ids[:PROMPT_TOKENS])
        for i in range(3):
            s.decode(ids[PROMPT_TOKENS + i])
        _sync()
        row["warmup_s"] = round(time.perf_counter() - t, 2)
        per_token: list[float] = []
        streamed: list[float] = []
        prefill: dict[int, list[float]] = {}
        for _ in range(args.rounds):
            s.reset()
            s.prefill(ids[:PROMPT_TOKENS])
            for i in range(n):  # synchronized after every token: the latency a caller sees
                per_token.append(_time_ms(lambda i=i: s.decode(ids[PROMPT_TOKENS + i])))
            s.reset()
            s.prefill(ids[:PROMPT_TOKENS])
            streamed.append(_time_ms(lambda: [s.decode(ids[PROMPT_TOKENS + i]) for i in range(n)]) / n)
            if name in ("graphs", "torch-eager"):
                for m in lengths:
                    s.reset()
                    prefill.setdefault(m, []).append(_time_ms(lambda m=m: s.prefill(ids[:m])))
        row["decode_ms_per_token"] = round(statistics.median(per_token), 4)
        row["decode_ms_p10"] = round(statistics.quantiles(per_token, n=10)[0], 4)
        row["decode_ms_p90"] = round(statistics.quantiles(per_token, n=10)[-1], 4)
        row["decode_ms_per_token_unsynced"] = round(statistics.median(streamed), 4)
        row["prefill_ms"] = {str(m): round(statistics.median(v), 2) for m, v in prefill.items()}
        s.close()
        every_batch = name in ("graphs", "graphs-before-mma", "graphs-two-kernel-attention", "graphs-before-splits")
        if every_batch or (name == "torch-eager" and args.decode_tokens):
            tps: dict[str, float] = {}
            for B in batches if every_batch else batches[:2]:
                batch = model.new_batch(B, capacity=PROMPT_TOKENS + 8 + n + 8)
                for b in range(B):  # different lengths: 24 to 31 prompt tokens
                    batch.prefill(b, ids[b % 8 : b % 8 + PROMPT_TOKENS + b % 8])
                last = [ids[PROMPT_TOKENS + b] for b in range(B)]
                batch.decode(last)  # capture
                steps = min(n, 32)
                ms = _time_ms(lambda batch=batch, last=last, steps=steps: [batch.decode(last) for _ in range(steps)])
                tps[str(B)] = round(B * steps / (ms * 1e-3), 1)
                del batch
            row["aggregate_tokens_per_s"] = tps
    del model
    torch.cuda.empty_cache()
    return row


def _peer(path: str, ids: list[int], lengths: list[int], n: int, rounds: int) -> dict[str, Any]:
    """transformers' LlamaForCausalLM (eager attention, bfloat16) on the same weights."""
    import torch
    import transformers

    from driftwood.model.reference import hf_model

    hf = hf_model(path, dtype=torch.bfloat16, device="cuda")
    row: dict[str, Any] = {"variant": "transformers-eager", "file": os.path.basename(path),
                           "transformers": transformers.__version__}
    x = torch.tensor([ids[:PROMPT_TOKENS]], device="cuda")
    kw = {"do_sample": False, "pad_token_id": 0}
    with torch.inference_mode():
        hf.generate(x, max_new_tokens=4, min_new_tokens=4, **kw)  # warm-up
        one, many = [], []
        for _ in range(rounds):
            one.append(_time_ms(lambda: hf.generate(x, max_new_tokens=1, min_new_tokens=1, **kw)))
            many.append(_time_ms(lambda: hf.generate(x, max_new_tokens=n + 1, min_new_tokens=n + 1, **kw)))
        row["decode_ms_per_token"] = round((statistics.median(many) - statistics.median(one)) / n, 3)
        prefill = {}
        for m in lengths:
            xm = torch.tensor([ids[:m]], device="cuda")
            hf(xm, logits_to_keep=1)
            prefill[str(m)] = round(statistics.median(_time_ms(lambda xm=xm: hf(xm, logits_to_keep=1))
                                                      for _ in range(rounds)), 2)
        row["prefill_ms"] = prefill
    hf = None  # free the GPU memory before the next model
    torch.cuda.empty_cache()
    return row


def run_cuda(args: argparse.Namespace) -> int:
    """Every variant of every file, plus the copy bandwidth and the transformers peer."""
    import torch

    from driftwood.bench.report import default_path, environment, format_table, progress, write_json
    from driftwood.model.gguf import GGUFFile
    from driftwood.model.registry import resolve
    from driftwood.model.tokenizer import Tokenizer

    lengths = [int(x) for x in args.prefill_lengths.split(",")]
    batches = [int(x) for x in args.batches.split(",")]
    paths = [str(resolve(m.strip())) for m in args.model.split(",") if m.strip()]
    names = [v.strip() for v in args.variants.split(",") if v.strip() in CUDA_VARIANTS] or ["graphs"]
    env = environment(args.device)
    env["gpu_copy_bandwidth_gb_s"] = round(copy_bandwidth(), 1)
    progress(f"device copy bandwidth {env['gpu_copy_bandwidth_gb_s']} GB/s")
    with GGUFFile(paths[0]) as f:
        tokenizer = Tokenizer.from_gguf(f.metadata)
    need = max(lengths) + PROMPT_TOKENS + args.decode_tokens + 16
    ids: list[int] = []
    while len(ids) < need:
        ids += tokenizer.encode(TEXT, add_bos=False)
    rows: list[dict[str, Any]] = []
    for path in paths:
        dense_file = "bf16" in os.path.basename(path) or "f16" in os.path.basename(path)
        for name in names:
            if name == "graphs-triton-dense" and not dense_file:
                continue
            progress(f"{os.path.basename(path)}: {name}")
            try:
                row = _cuda_variant(path, name, args, ids, lengths, batches)
            except Exception as exc:  # a failing variant is recorded, the others still run
                row = {"variant": name, "file": os.path.basename(path), "error": f"{type(exc).__name__}: {exc}"}
                torch.cuda.empty_cache()
            if "weight_bytes_per_step" in row:
                floor = row["weight_bytes_per_step"] / (env["gpu_copy_bandwidth_gb_s"] * 1e9) * 1e3
                row["floor_ms_per_token"] = round(floor, 4)
            progress(f"  {row}")
            rows.append(row)
        if args.peer and dense_file:
            progress(f"{os.path.basename(path)}: transformers")
            try:
                rows.append(_peer(path, ids, lengths, args.decode_tokens, args.rounds))
            except Exception as exc:
                rows.append({"variant": "transformers-eager", "file": os.path.basename(path),
                             "error": f"{type(exc).__name__}: {exc}"})
            progress(f"  {rows[-1]}")
    flat = []
    for r in rows:
        agg = r.get("aggregate_tokens_per_s", {})
        flat.append({**r, **{f"prefill_{k}": v for k, v in r.get("prefill_ms", {}).items()},
                     **{f"tps_{k}": v for k, v in agg.items()}})
    print(format_table(flat, [("file", "file"), ("variant", "variant"),
                              ("decode_ms_per_token", "ms/token"), ("floor_ms_per_token", "floor"),
                              *[(f"prefill_{m}", f"prefill {m}") for m in lengths],
                              *[(f"tps_{b}", f"tok/s B={b}") for b in batches], ("error", "error")]))
    path = write_json({
        "benchmark": "decode", "environment": env, "models": [os.path.basename(p) for p in paths],
        "settings": {"prompt_tokens": PROMPT_TOKENS, "decode_tokens_per_round": args.decode_tokens,
                     "prefill_lengths": lengths, "batches": batches, "rounds": args.rounds},
        "results": rows,
    }, args.json_path or default_path("decode", args.device, env))
    progress(f"wrote {path}")
    return 0
