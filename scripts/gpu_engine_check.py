#!/usr/bin/env python3
"""Check the inference engine on CUDA against its CPU float32 path and transformers.

Writes a random-weight GGUF with the Llama-3.2-1B shape (hidden 2048, 32 heads / 8 KV heads,
FFN 8192, vocab 128256, tied embeddings, llama3 RoPE scaling) cut to a few layers, then for each
storage type checks, on the same weights:

- engine cuda float32 vs engine cpu float32: logits (max |err| / max |logit| < 1e-4) and greedy
  tokens identical;
- engine cuda float32 vs transformers LlamaForCausalLM (cuda float32, eager attention): logits
  (< 1e-4) and greedy tokens identical;
- engine cuda bfloat16 vs engine cpu float32: logits (||err|| / ||logits|| over all positions
  < 5e-2: a random model amplifies bfloat16 rounding at a few positions, so not a max) and
  top-1 agreement over the prompt's positions (>= 80%); the matching greedy prefix is
  reported, not required;
- a session's KV state moved to the CPU and back restores the next logits exactly; decode
  writes logits into a caller's CUDA buffer;
- with --compile (default): the torch.compile'd one-token step in bfloat16 against the eager
  bfloat16 step (||err|| / ||logits|| < 5e-2, top-1 >= 80%), and whether it compiled at all.

Results go to $OUT/gpu_engine_check.json (or --out); the exit status is 1 if a check fails.
``--device cpu`` runs every step on the CPU (the "cuda" side then is the CPU too).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from driftwood.model import SamplingParams, load_model
from driftwood.model.generate import complete
from driftwood.model.reference import hf_model
from driftwood.model.synthetic import PRESETS, write_synthetic

PROMPT = "The lighthouse keeper climbed the stairs at dusk, trimmed the wick and wrote: wind from the"
F32_TOL, BF16_TOL, BF16_TOP1 = 1e-4, 5e-2, 0.80


def environment(device: str) -> dict[str, Any]:
    import datetime
    import platform

    env = {"date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
           "command": " ".join(sys.argv), "device": device, "torch": torch.__version__,
           "python": platform.python_version(), "cpu": platform.processor() or platform.machine()}
    if device.startswith("cuda"):
        env.update(gpu=torch.cuda.get_device_name(), cuda=torch.version.cuda)
    from importlib.metadata import PackageNotFoundError, version

    for name in ("transformers", "gguf", "tokenizers"):
        try:
            env[name] = version(name)
        except PackageNotFoundError:
            env[name] = None
    return env


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float().cpu(), b.float().cpu()
    return float((a - b).abs().max() / b.abs().max())


def engine_run(model, ids: list[int], n: int) -> dict[str, Any]:
    """Logits at every prompt position (prefill then one-token decodes) and n greedy tokens."""
    s = model.new_session(capacity=len(ids) + n + 1)
    logits = [s.prefill(ids[:1])] + [s.decode(i) for i in ids[1:]]
    t = time.perf_counter()
    out = complete(model.new_session(capacity=len(ids) + n + 1, seed=0), ids, SamplingParams(), n,
                   stop_ids=())
    if model.device.type == "cuda":
        torch.cuda.synchronize()
    return {"logits": torch.stack(logits).float().cpu(), "greedy": out.output_ids,
            "decode_ms_per_token": out.stats.as_dict()["decode_ms_per_token"],
            "generate_s": time.perf_counter() - t}


def hf_run(hf, ids: list[int], n: int, device: str) -> dict[str, Any]:
    greedy = []
    with torch.no_grad():
        x = torch.tensor([ids], device=device)
        step = hf(x, use_cache=True)
        logits = step.logits[0].float().cpu()
        for _ in range(n):
            greedy.append(int(step.logits[0, -1].argmax()))
            nxt = torch.tensor([[greedy[-1]]], device=device)
            step = hf(nxt, past_key_values=step.past_key_values, use_cache=True)
    return {"logits": logits, "greedy": greedy}


def norm_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float().cpu(), b.float().cpu()
    return float((a - b).norm() / b.norm())


def matching_prefix(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


def check_file(path: Path, device: str, n: int, compile_step: bool) -> dict[str, Any]:
    checks: dict[str, Any] = {}

    def record(name: str, ok: bool, **detail: Any) -> None:
        checks[name] = {"ok": bool(ok), **detail}
        print(f"  {'PASS' if ok else 'FAIL'} {name} {json.dumps(detail)}", flush=True)

    cpu = load_model(str(path), device="cpu", dtype="float32", weights="dense", progress=False)
    ids = cpu.tokenizer.encode(PROMPT)
    ref = engine_run(cpu, ids, n)
    del cpu

    gpu32 = load_model(str(path), device=device, dtype="float32", weights="dense", progress=False)
    got = engine_run(gpu32, ids, n)
    record("engine_f32_vs_cpu_f32_logits", rel_err(got["logits"], ref["logits"]) < F32_TOL,
           rel_err=rel_err(got["logits"], ref["logits"]), tol=F32_TOL)
    record("engine_f32_vs_cpu_f32_greedy", got["greedy"] == ref["greedy"],
           tokens=n, matching=matching_prefix(got["greedy"], ref["greedy"]))

    # the session API on the device: KV state through the CPU and back, logits into a buffer
    s = gpu32.new_session(capacity=len(ids) + 4)
    s.prefill(ids)
    state = {k: v.cpu() for k, v in s.kv_state().items()}
    t = gpu32.new_session(capacity=len(ids) + 4)
    t.load_kv_state(list(ids), state)
    buf = torch.zeros(gpu32.config.vocab_size + 2, device=gpu32.device)
    out = t.decode(42, logits_out=buf[1:-1])
    want = s.decode(42)
    record("kv_state_round_trip_and_logits_out", torch.equal(out, want) and out.data_ptr() == buf[1:].data_ptr(),
           max_diff=float((out - want).abs().max()))
    del s, t

    hf = hf_model(path, dtype=torch.float32, device=device)
    hf_out = hf_run(hf, ids, n, device)
    del hf
    record("engine_f32_vs_transformers_logits", rel_err(got["logits"], hf_out["logits"]) < F32_TOL,
           rel_err=rel_err(got["logits"], hf_out["logits"]), tol=F32_TOL)
    record("engine_f32_vs_transformers_greedy", got["greedy"] == hf_out["greedy"],
           tokens=n, matching=matching_prefix(got["greedy"], hf_out["greedy"]))
    f32_decode_ms = got["decode_ms_per_token"]
    del gpu32

    gpu16 = load_model(str(path), device=device, dtype="bfloat16", weights="dense", graphs=False,
                       progress=False)
    got16 = engine_run(gpu16, ids, n)
    top1 = float((got16["logits"].argmax(-1) == ref["logits"].argmax(-1)).float().mean())
    record("engine_bf16_vs_cpu_f32_logits", norm_err(got16["logits"], ref["logits"]) < BF16_TOL,
           norm_err=norm_err(got16["logits"], ref["logits"]), tol=BF16_TOL,
           max_rel_err=rel_err(got16["logits"], ref["logits"]))
    record("engine_bf16_vs_cpu_f32_top1", top1 >= BF16_TOP1, agreement=top1, min=BF16_TOP1,
           greedy_matching_prefix=matching_prefix(got16["greedy"], ref["greedy"]), tokens=n)
    timings = {"f32": f32_decode_ms, "bf16": got16["decode_ms_per_token"]}
    del gpu16

    if device.startswith("cuda"):
        # the fast path: fused Triton kernels in CUDA graphs, weights as stored (Q4_0 / Q8_0
        # blocks, else dense), against the CPU float32 path and the same step without graphs
        fast = {}
        for capture in (True, False):
            m = load_model(str(path), device=device, dtype="bfloat16", progress=False)
            m.graph_capture = capture
            fast[capture] = engine_run(m, ids, n)
            weights = m.weights
            del m
        g, e = fast[True], fast[False]
        top1g = float((g["logits"].argmax(-1) == ref["logits"].argmax(-1)).float().mean())
        record("graphs_bf16_vs_cpu_f32_logits", norm_err(g["logits"], ref["logits"]) < BF16_TOL,
               weights=weights, norm_err=norm_err(g["logits"], ref["logits"]), tol=BF16_TOL,
               max_rel_err=rel_err(g["logits"], ref["logits"]))
        record("graphs_bf16_vs_cpu_f32_top1", top1g >= BF16_TOP1, agreement=top1g, min=BF16_TOP1,
               greedy_matching_prefix=matching_prefix(g["greedy"], ref["greedy"]), tokens=n)
        record("graphs_bf16_vs_transformers_f32_logits",
               norm_err(g["logits"], hf_out["logits"]) < BF16_TOL,
               norm_err=norm_err(g["logits"], hf_out["logits"]), tol=BF16_TOL)
        record("graphs_vs_no_graphs_greedy_identical", g["greedy"] == e["greedy"],
               tokens=n, matching=matching_prefix(g["greedy"], e["greedy"]),
               logits_max_diff=float((g["logits"] - e["logits"]).abs().max()))
        timings["bf16_graphs"] = g["decode_ms_per_token"]
        timings["bf16_fused_no_graphs"] = e["decode_ms_per_token"]

    if compile_step:
        t = time.perf_counter()
        gpuc = load_model(str(path), device=device, dtype="bfloat16", weights="dense", compile=True,
                          progress=False)
        gotc = engine_run(gpuc, ids, n)
        top1c = float((gotc["logits"].argmax(-1) == got16["logits"].argmax(-1)).float().mean())
        record("compiled_bf16_vs_eager_bf16", gpuc.compiled and norm_err(gotc["logits"], got16["logits"]) < BF16_TOL
               and top1c >= BF16_TOP1, compiled=gpuc.compiled, norm_err=norm_err(gotc["logits"], got16["logits"]),
               top1=top1c, greedy_matching_prefix=matching_prefix(gotc["greedy"], got16["greedy"]),
               seconds_with_compile=round(time.perf_counter() - t, 1))
        timings["bf16_compiled"] = gotc["decode_ms_per_token"]
    return {"file": path.name, "prompt_tokens": len(ids), "checks": checks,
            "greedy_cpu_f32": ref["greedy"], "decode_ms_per_token": timings}


SWEEP_CONFIGS = {  # rows of x -> configs tried (see kernels.CONFIGS); SWEEP_ROWS picks the rows. The int8
    # kernels at 5-64 rows have their own sweep (scripts/gpu/int8_sweep.py); the tile kernels dot, dotg and dotj
    # that the earlier sweeps here timed are gone (docs/gpu.md)
    1: [("gemvT", bn, wpt) for bn in (2, 4, 8, 16) for wpt in (4, 8)] + [("dp4a", bn, 4) for bn in (4, 16)],
    2: [("gemvT", 4, 4), ("gemvT", 8, 4), ("mm", 0), ("mm", 16)],
    8: [("gemvT", 8, 4), ("mm", 0), ("mm", 8), ("i8", 16, 64, 4, 4, 4)],
    16: [("gemvT", 8, 4), ("mm", 0), ("i8", 16, 64, 4, 4, 4)],
    32: [("mm", 0), ("mm", 16), ("i8", 32, 128, 4, 4, 1)],
    64: [("mm", 0), ("mm", 16), ("i8", 64, 128, 4, 5, 1), ("i8", 64, 128, 4, 5, 2)],
}
if os.environ.get("SWEEP_ROWS"):
    SWEEP_CONFIGS = {int(m): SWEEP_CONFIGS[int(m)] for m in os.environ["SWEEP_ROWS"].split(",")}


def graph_ms(fn, replays: int = 20) -> float:
    """Median ms of ``fn`` replayed as a CUDA graph, as decode runs it (timed from Python,
    products of a few microseconds are bound by Triton's launch overhead instead, ~20-50 us a
    launch depending on the host)."""
    import statistics

    fn()  # compile, and let any scratch buffer reach its size before capture
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        g.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


# (N, K) of each product of the Llama-3.2-1B shape, and those decode runs with RMSNorm inside
SHAPES_1B = {"qkv": (3072, 2048), "o": (2048, 2048), "gate_up": (16384, 2048), "down": (2048, 8192),
             "head": (128256, 2048)}
NORMED = ("qkv", "gate_up", "head")


def time_quantized(fmt: int, name: str, rows: Sequence[int],
                   candidates: Callable[[int, int, int], Sequence[tuple]]) -> list[dict[str, Any]]:
    """µs a product of each configuration ``candidates(m, N, K)`` for m in ``rows`` rows of x
    against the 1B shape's ``name`` matrix in ``fmt`` (random codes), replayed in a CUDA graph
    over enough copies of the matrix (one after the other) to defeat the 50 MB L2 for the small
    ones, RMSNorm inside for qkv, gate_up and the head where the kernel can (as decode runs them).
    One row of results per configuration: us and gb_s (weight bytes), or the error of one that
    does not compile."""
    from driftwood.model.cuda import kernels as K

    N, Kd = SHAPES_1B[name]
    per_word = 8 if fmt == K.Q4_0 else 4
    nbytes = N * Kd // per_word * 4 + N * Kd // 32 * 2
    copies = max(1, min(16, (200 << 20) // nbytes))
    mats = [(torch.randint(-2**31, 2**31 - 1, (N, Kd // per_word), dtype=torch.int32, device="cuda"),
             (torch.rand(N, Kd // 32, device="cuda") * 0.01).half()) for _ in range(copies)]
    nw = torch.rand(Kd, device="cuda").bfloat16()
    out_rows = []
    for m in rows:
        x = torch.randn(m, Kd, device="cuda").bfloat16()
        out = torch.empty(m, N, device="cuda", dtype=torch.bfloat16)
        for cfg in candidates(m, N, Kd):
            norm = (nw, 1e-5) if name in NORMED and K.fuses_norm(fmt, m, config=cfg) else None

            def once(cfg=cfg, x=x, out=out, norm=norm, mats=mats):
                for c, sc in mats:
                    K.gemv(x, fmt, c, sc, out=out, config=cfg, norm=norm)

            row = {"shape": name, "fmt": fmt, "M": m, "config": cfg}
            try:
                ms = graph_ms(once) / len(mats)
            except Exception as exc:  # a configuration that does not compile
                out_rows.append({**row, "error": repr(exc)[:300]})
                continue
            out_rows.append({**row, "us": ms * 1e3, "gb_s": nbytes / ms / 1e6, "norm": norm is not None})
    del mats
    torch.cuda.empty_cache()
    return out_rows


def sweep() -> list[dict[str, Any]]:
    """GB/s (weight bytes / time) of the quantized kernels per configuration, format and row
    count, on the Llama-3.2-1B shapes (:func:`time_quantized`); torch.mm on dense bfloat16 for
    reference."""
    import itertools

    from driftwood.model.cuda import kernels as K

    shapes = SHAPES_1B
    rows_out = []
    for name, fmt in itertools.product(shapes, (K.Q4_0, K.Q8_0)):
        timed = time_quantized(fmt, name, list(SWEEP_CONFIGS), lambda m, n, k: SWEEP_CONFIGS[m])
        rows_out += [{**{k: v for k, v in r.items() if k != "us"}, "ms": r["us"] / 1e3} if "us" in r else r
                     for r in timed]
        for M in SWEEP_CONFIGS:
            best = max((r for r in rows_out if r["shape"] == name and r["fmt"] == fmt and r["M"] == M
                        and "gb_s" in r), key=lambda r: r["gb_s"], default=None)
            if best:
                print(f"sweep {name} fmt={fmt} M={M}: best {best['config']} {best['ms'] * 1e3:.1f} us "
                      f"{best['gb_s']:.0f} GB/s", flush=True)
    for name, (N, Kd) in shapes.items():
        ws = [torch.randn(N, Kd, device="cuda").bfloat16() for _ in range(max(1, min(16, (200 << 20) // (N * Kd * 2))))]
        for M in (1, 64):
            x = torch.randn(M, Kd, device="cuda").bfloat16()
            ms = graph_ms(lambda x=x, ws=ws: [x @ w.t() for w in ws]) / len(ws)
            rows_out.append({"shape": name, "fmt": "torch.mm", "M": M, "ms": ms, "gb_s": N * Kd * 2 / ms / 1e6})
        del ws
    # per (fmt, M): the config with the least total time over one layer's four matrices plus the head
    for fmt, M in itertools.product((K.Q4_0, K.Q8_0), SWEEP_CONFIGS):
        tot: dict[tuple, float] = {}
        for r in rows_out:
            if r["fmt"] == fmt and r["M"] == M and "ms" in r:
                w = 1 / 16 if r["shape"] == "head" else 1.0
                tot[tuple(r["config"])] = tot.get(tuple(r["config"]), 0.0) + r["ms"] * w
        full = {c: t for c, t in tot.items()
                if sum(1 for r in rows_out if r["fmt"] == fmt and r["M"] == M and tuple(r.get("config", ())) == c
                       and "ms" in r) == len(shapes)}
        if full:
            c = min(full, key=full.get)
            print(f"sweep best overall fmt={fmt} M={M}: {c} {full[c] * 1e3:.1f} us per layer + head/16", flush=True)
    return rows_out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--layers", type=int, default=2, help="layers of the 1B shape to keep (default 2)")
    p.add_argument("--dtypes", default="bf16,q4_0,q8_0,q4_k_m", help="GGUF storage types to check")
    p.add_argument("--tokens", type=int, default=16, help="greedy tokens to compare")
    p.add_argument("--out", default=os.environ.get("OUT", "gpu-check-out"))
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False,
                   help="also check the torch.compile'd decode step (default off)")
    p.add_argument("--sweep", action="store_true",
                   help="time the GEMV kernel's block configurations on the 1B shapes first")
    args = p.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("no CUDA device visible to torch", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    config = dataclasses.replace(PRESETS["llama3.2-1b"], n_layers=args.layers)
    results: dict[str, Any] = {"environment": environment(args.device), "config": dataclasses.asdict(config),
                               "tolerances": {"f32": F32_TOL, "bf16": BF16_TOL, "bf16_top1": BF16_TOP1},
                               "files": []}
    ok = True
    if args.sweep:
        results["gemv_sweep"] = sweep()
        (out / "gpu_engine_check.json").write_text(json.dumps(results, indent=2) + "\n")
    if args.device.startswith("cuda"):  # needs the checkout's root on PYTHONPATH (setup.sh)
        from tests.model.kernel_check import main as kernel_check

        try:
            results["kernels_vs_torch"] = kernel_check(args.device)
            print("PASS kernels vs torch", results["kernels_vs_torch"], flush=True)
        except Exception as exc:  # recorded; the rest still runs
            results["kernels_vs_torch"] = {"error": repr(exc)}
            ok = False
            print("FAIL kernels vs torch", exc, flush=True)
    for dtype in [d.strip() for d in args.dtypes.split(",") if d.strip()]:
        path = out / f"llama3.2-1b-{args.layers}l-{dtype}.gguf"
        t = time.perf_counter()
        write_synthetic(path, config, dtype, seed=0)
        print(f"{path.name}: written in {time.perf_counter() - t:.1f} s", flush=True)
        result = check_file(path, args.device, args.tokens, args.compile)
        results["files"].append(result)
        ok &= all(c["ok"] for c in result["checks"].values())
        path.unlink()  # large; the JSON is what comes back
    results["ok"] = ok
    (out / "gpu_engine_check.json").write_text(json.dumps(results, indent=2) + "\n")
    print(f"{'ALL PASS' if ok else 'SOME CHECKS FAILED'}; wrote {out / 'gpu_engine_check.json'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
