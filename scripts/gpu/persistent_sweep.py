"""Batch-1 decode with each layer as one persistent kernel (``TritonOps(persistent=True)``,
:mod:`driftwood.model.cuda.persistent`) against the kernel-per-product step, in one process on
the same BF16 weights: one session per setting, the settings interleaved token by token within
each round (drift between them cancels); every setting's logits compared with the plain step's
(relative difference, and whether the greedy token is the same).

Usage: python scripts/gpu/persistent_sweep.py OUT.json   (environment: MODEL (default
/tmp/llama3.2-1b-bf16.gguf, as scripts/gpu/decode.sh writes it), CONFIGS="4,4,4,4,2048,8,1;..."
(persistent.CONFIG's fields: rows a tile of qkv, o, gate_up, down; columns a chunk; num_warps;
programs a multiprocessor), ROUNDS=5, TOKENS=24, CONTEXT=24 (prompt tokens before the timed ones))"""

from __future__ import annotations

import os
import statistics
import sys
import time

import torch

from driftwood.bench.report import environment, format_table, progress, write_json
from driftwood.model import load_model
from driftwood.model.cuda import persistent
from driftwood.model.cuda.decoder import TritonOps

MODEL = os.environ.get("MODEL", "/tmp/llama3.2-1b-bf16.gguf")
CONFIGS = [tuple(int(v) for v in c.split(",")) for c in
           os.environ.get("CONFIGS", "4,4,4,4,2048,8,1;2,2,2,2,2048,8,1;8,8,8,8,1024,8,1;4,4,4,4,1024,4,2").split(";")]
ROUNDS = int(os.environ.get("ROUNDS", "5"))
TOKENS = int(os.environ.get("TOKENS", "24"))
CONTEXT = int(os.environ.get("CONTEXT", "24"))
PROMPT = [(i * 7919) % 100000 + 5 for i in range(CONTEXT + TOKENS + 1)]


def layer_check() -> dict:
    """One Llama-3.2-1B-shaped layer on random weights: the persistent kernel (eager, then replayed
    in a CUDA graph) against the kernel-per-product layer, and the time of 16 such layers (over
    distinct weights, so that L2 does not serve them) in a graph each way."""
    import types

    from driftwood.model.weights import DenseLinear

    torch.manual_seed(0)
    dim, H, HKV, D, ffn, cap = 2048, 32, 8, 64, 8192, 4160
    bf = dict(dtype=torch.bfloat16, device="cuda")

    def make():
        w = lambda n, k: DenseLinear(torch.randn(n, k, **bf) / k**0.5)  # noqa: E731
        return types.SimpleNamespace(attn_norm=torch.rand(dim, **bf) + 0.5, ffn_norm=torch.rand(dim, **bf) + 0.5,
                                     eps=1e-5, attn=types.SimpleNamespace(wqkv=w((H + 2 * HKV) * D, dim), wo=w(dim, dim)),
                                     mlp=types.SimpleNamespace(w13=w(2 * ffn, dim), w2=w(dim, ffn)))

    layers = [make() for _ in range(16)]
    inv = (1.0 / 500000 ** (torch.arange(0, D, 2).float() / D)).cuda()
    pos = torch.tensor([300], device="cuda")
    x0 = torch.randn(1, dim, **bf)
    kc, vc = torch.randn(16, 1, HKV, cap, D, **bf), torch.randn(16, 1, HKV, cap, D, **bf)
    result = {}
    plain, pers = TritonOps(), TritonOps(persistent=True)
    for name, ops in (("plain", plain), ("persistent", pers)):
        k, v = kc.clone(), vc.clone()
        x = x0.clone()
        for i, lay in enumerate(layers):
            x = ops.layer(x, lay, pos, inv, k[i], v[i], H, HKV, D)
        torch.cuda.synchronize()
        result[name] = (x.float(), k[:, :, :, 300].float(), v[:, :, :, 300].float())
        graph = torch.cuda.CUDAGraph()
        xg = x0.clone()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            ops.layer(xg.clone(), layers[0], pos, inv, k[0], v[0], H, HKV, D)
        torch.cuda.current_stream().wait_stream(side)
        with torch.cuda.graph(graph):
            y = xg.clone()
            for i, lay in enumerate(layers):
                y = ops.layer(y, lay, pos, inv, k[i], v[i], H, HKV, D)
        graph.replay()
        torch.cuda.synchronize()
        result[name + " graph"] = (y.float(),)
        ts = []
        for _ in range(50):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            graph.replay()
            b.record()
            b.synchronize()
            ts.append(a.elapsed_time(b) * 1e3 / 16)
        result[name + " us a layer"] = statistics.median(ts)
    rel = lambda a, b: float((a - b).norm() / b.norm())  # noqa: E731
    report = {"x rel": rel(result["persistent"][0], result["plain"][0]),
              "k rel": rel(result["persistent"][1], result["plain"][1]),
              "v rel": rel(result["persistent"][2], result["plain"][2]),
              "graph equals eager": bool(torch.equal(result["persistent graph"][0], result["persistent"][0])),
              "plain us a layer": result["plain us a layer"], "persistent us a layer": result["persistent us a layer"],
              "grids": {str(k): g for k, g in persistent._GRIDS.items()}}
    progress(f"layer check: {report}")
    return report


def phase_times(configs: list[tuple]) -> list[dict]:
    """Microseconds a layer of each phase alone (one launch of the persistent grid, the barriers
    kept), of all phases, and of the barriers alone (no phase), over 16 layers' distinct random
    weights in a CUDA graph: where the persistent layer's time goes."""
    dim, H, HKV, D, ffn, cap = 2048, 32, 8, 64, 8192, 4160
    bf = dict(dtype=torch.bfloat16, device="cuda")
    ws = [[torch.randn(n, k, **bf) / k**0.5 for n, k in (((H + 2 * HKV) * D, dim), (dim, dim), (2 * ffn, dim),
                                                           (dim, ffn))] for _ in range(16)]
    norm = torch.rand(dim, **bf) + 0.5
    inv = (1.0 / 500000 ** (torch.arange(0, D, 2).float() / D)).cuda()
    pos = torch.tensor([24], device="cuda")
    kc, vc = torch.randn(16, 1, HKV, cap, D, **bf), torch.randn(16, 1, HKV, cap, D, **bf)
    x = torch.randn(1, dim, **bf)
    rows = []
    for cfg in configs:
        for name, phases in (("none", 0), ("qkv", 1), ("attention", 2), ("o", 4), ("gate_up", 8), ("down", 16),
                             ("all", 31)):
            def run(cfg=cfg, phases=phases):
                for i, (wqkv, wo, w13, w2) in enumerate(ws):
                    persistent.layer(x, norm, wqkv, wo, norm, w13, w2, 1e-5, pos, inv, kc[i], vc[i], H, HKV, D,
                                     config=cfg, phases=phases)
            run()
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                run()
            ts = []
            for _ in range(30):
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                graph.replay()
                b.record()
                b.synchronize()
                ts.append(a.elapsed_time(b) * 1e3 / 16)
            rows.append({"config": list(cfg), "phases": name, "us_a_layer": round(statistics.median(ts), 2)})
            progress(f"{cfg} {name}: {rows[-1]['us_a_layer']} us a layer")
            x.copy_(torch.randn(1, dim, **bf))  # keep it finite
    print(format_table(rows, [("config", "config"), ("phases", "phases"), ("us_a_layer", "us a layer")]))
    return rows


def main(out: str) -> int:
    check = layer_check()
    phases = phase_times(CONFIGS[:int(os.environ.get("PHASE_CONFIGS", "1"))])
    model = load_model(MODEL, device="cuda", dtype="bfloat16", progress=False)
    settings: list[tuple | None] = [None, *CONFIGS]  # None: the plain step
    sessions, grids, errors = [], [], []
    for cfg in settings:
        model.decode_ops = TritonOps(persistent=cfg is not None, persistent_config=cfg)
        s = model.new_session(capacity=CONTEXT + TOKENS + 4096)  # as the benchmark sizes it
        try:
            s.prefill(PROMPT[:CONTEXT])
            s.decode(PROMPT[CONTEXT])  # captures the graph with these ops
            torch.cuda.synchronize()
        except Exception as e:
            progress(f"{cfg}: {type(e).__name__}: {e}")
            errors.append({"config": cfg, "error": f"{type(e).__name__}: {e}"})
            s.close()
            continue
        sessions.append((cfg, s))
        grids.append(next((g for k, g in persistent._GRIDS.items() if k[-1] == cfg), None) if cfg else None)
        progress(f"{cfg}: captured (grid {grids[-1]})")
    times: list[list[float]] = [[] for _ in sessions]
    worst = [0.0] * len(sessions)
    greedy_differs = [0] * len(sessions)
    for _ in range(ROUNDS):
        for _, s in sessions:
            s.reset()
            s.prefill(PROMPT[:CONTEXT])
        for i in range(TOKENS):
            want = None
            for j, (_, s) in enumerate(sessions):
                torch.cuda.synchronize()
                t = time.perf_counter()
                logits = s.decode(PROMPT[CONTEXT + i])
                torch.cuda.synchronize()
                times[j].append((time.perf_counter() - t) * 1e3)
                if want is None:
                    want = logits.float().clone()
                else:
                    lf = logits.float()
                    worst[j] = max(worst[j], float((lf - want).norm() / want.norm()))
                    greedy_differs[j] += int(lf.argmax() != want.argmax())
    base = statistics.median(times[0])
    rows = []
    for (cfg, _), grid, ts, w, g in zip(sessions, grids, times, worst, greedy_differs, strict=True):
        med = statistics.median(ts)
        rows.append({"config": list(cfg) if cfg else "plain", "grid": grid, "context": CONTEXT,
                     "decode_ms_per_token": round(med, 4),
                     "decode_ms_p10": round(statistics.quantiles(ts, n=10)[0], 4),
                     "decode_ms_p90": round(statistics.quantiles(ts, n=10)[-1], 4),
                     "delta_us": round((med - base) * 1e3, 1), "tokens_timed": len(ts),
                     "max_rel_logits_diff": w, "greedy_differs": g})
    print(format_table(rows, [("config", "config"), ("grid", "grid"), ("decode_ms_per_token", "ms/token"),
                              ("decode_ms_p10", "p10"), ("decode_ms_p90", "p90"), ("delta_us", "vs plain us"),
                              ("max_rel_logits_diff", "max rel diff"), ("greedy_differs", "greedy differs")]))
    write_json({"benchmark": "persistent-sweep", "environment": environment("cuda"), "model": os.path.basename(MODEL),
                "cooperative": persistent.COOPERATIVE, "layer_check": check, "phase_times": phases, "rows": rows, "errors": errors}, out)
    return 1 if any(r["max_rel_logits_diff"] > 2e-2 for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
