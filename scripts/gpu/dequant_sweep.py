"""The Q4_0 / Q8_0 dequantizer (kernels.dequantize: prefill, and the dequantize + cuBLAS products
of batched decode) per configuration on the Llama-3.2-1B shapes: GB/s of bytes moved (codes and
scales read, bfloat16 written), beside a plain device copy of the same output size. Prints the
best configuration per shape and writes JSON. Usage: python scripts/gpu/dequant_sweep.py OUT.json"""

from __future__ import annotations

import itertools
import json
import sys

import torch
import triton.testing

from driftwood.model.cuda import kernels as K

SHAPES = {"qkv": (3072, 2048), "o": (2048, 2048), "gate_up": (16384, 2048), "down": (2048, 8192),
          "head": (128256, 2048)}
CONFIGS = [(r, c, w) for r in (2, 4, 8, 16) for c in (128, 256, 512) for w in (2, 4, 8) if r * c <= 4096]


def main() -> int:
    rows = []
    for (name, (N, Kd)), fmt in itertools.product(SHAPES.items(), (K.Q4_0, K.Q8_0)):
        per_word = 8 if fmt == K.Q4_0 else 4
        nbytes = N * Kd // per_word * 4 + N * Kd // 32 * 2 + N * Kd * 2
        copies = max(1, min(8, (200 << 20) // nbytes))
        mats = [(torch.randint(-2**31, 2**31 - 1, (N, Kd // per_word), dtype=torch.int32, device="cuda"),
                 (torch.rand(N, Kd // 32, device="cuda") * 0.01).half()) for _ in range(copies)]
        out = torch.empty(N, Kd, device="cuda", dtype=torch.bfloat16)
        src = torch.empty_like(out)
        ms = triton.testing.do_bench(lambda out=out, src=src: out.copy_(src), warmup=5, rep=30, return_mode="median")
        rows.append({"shape": name, "fmt": fmt, "config": "copy", "ms": ms, "gb_s": 2 * out.numel() * 2 / ms / 1e6})
        ref = None
        for cfg in CONFIGS:
            it = itertools.cycle(mats)

            def call(it=it, cfg=cfg, fmt=fmt, out=out):
                c, s = next(it)
                K.dequantize(fmt, c, s, out, config=cfg)

            try:
                c0, s0 = mats[0]
                got = K.dequantize(fmt, c0, s0, torch.empty_like(out), config=cfg)
                if ref is None:
                    ref = got
                same = bool(torch.equal(got, ref))
                ms = triton.testing.do_bench(call, warmup=5, rep=30, return_mode="median")
                rows.append({"shape": name, "fmt": fmt, "config": cfg, "ms": ms, "gb_s": nbytes / ms / 1e6,
                             "same_bits_as_first": same})
            except Exception as exc:  # a configuration that does not compile
                rows.append({"shape": name, "fmt": fmt, "config": cfg, "error": repr(exc)[:300]})
        mine = [r for r in rows if r["shape"] == name and r["fmt"] == fmt and "gb_s" in r and r["config"] != "copy"]
        best = max(mine, key=lambda r: r["gb_s"])
        print(f"{name} fmt={fmt}: copy {rows[-len(CONFIGS) - 1]['gb_s']:.0f} GB/s, "
              f"best {best['config']} {best['gb_s']:.0f} GB/s ({best['ms'] * 1e3:.1f} us), "
              f"all equal: {all(r['same_bits_as_first'] for r in mine)}", flush=True)
        del mats
    total = {}
    for r in rows:
        if "ms" in r and r["config"] != "copy":
            w = 1 / 16 if r["shape"] == "head" else 1.0
            total.setdefault((r["fmt"], tuple(r["config"])), 0.0)
            total[(r["fmt"], tuple(r["config"]))] += r["ms"] * w
    for fmt in (K.Q4_0, K.Q8_0):
        best = min((c for f, c in total if f == fmt), key=lambda c: total[(fmt, c)])
        print(f"fmt={fmt}: best overall {best} {total[(fmt, best)] * 1e3:.1f} us per layer + head/16", flush=True)
    env = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__}
    with open(sys.argv[1], "w") as f:
        json.dump({"environment": env, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
