"""The launch policy of the decode step's quantized and dense products for 1-64 rows, as
measured on the H100 (docs/gpu.md): which kernel and configuration :func:`~driftwood.model.cuda.kernels.gemv`
runs for m rows of x against an (n, k) matrix. Plain data and functions, no Triton, so that the
configurations it names can be checked (tests/model/test_nvrtc_compile.py compiles the CUDA C++
ones on a machine without a GPU).
"""

from __future__ import annotations

DENSE, Q8_0, Q4_0 = 0, 1, 2

# (format, rows <= m) -> config; see docs/gpu.md (the best of scripts/gpu_engine_check.py --sweep and
# scripts/gpu/int8_sweep.py on the H100 over the 1B shapes). Dense: (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, use_dot).
# Quantized: ("gemvT", BLOCK_N, words a thread holds of a row: num_warps follows from K), ("dp4a", the same:
# int8 activations, four products an instruction), ("i8", BLOCK_M, BLOCK_N, num_warps, num_stages, split: int8
# activations, int8 tensor-core dots, the groups split among programs), or ("mm", chunk MB): dequantized to
# bfloat16 chunk by chunk, then cuBLAS. Quantized entries may depend on the matrix: {"vocab": N >= 32768 (falls back to "wide"), "wide":
# N >= 8192, "deep": K >= 4096, "narrow": N <= 2048, "mid": the rest} (the 1B shapes: the head vocab, gate_up
# wide, down deep, o narrow, qkv mid), from the sweeps of 2026-11-22 (docs/gpu.md).
_Q8_16 = ("i8", 16, 64, 4, 4, 4)
CONFIGS: dict[tuple[int, int], tuple | dict[str, tuple]] = {
    # batch 1: the sweeps of 2026-11-22 timed in CUDA graphs, RMSNorm inside for qkv, gate_up and the head as
    # decode runs them (scripts/gpu/dense_sweep.py; scripts/gpu_engine_check.py --sweep with SWEEP_ROWS=1):
    # BF16 gate_up 26.9 us (2.5 TB/s), head 174, qkv 7.7, o 5.6, down 14.6
    (DENSE, 1): {"wide": (1, 2, 256, 1, False), "deep": (1, 2, 1024, 4, False),
                 "narrow": (1, 1, 512, 1, False), "mid": (1, 4, 512, 4, False)},
    (DENSE, 8): (16, 64, 256, 4, True),
    (DENSE, 64): (16, 64, 256, 4, True),
    # Q4_0 (scripts/gpu/int8_sweep.py, 2026-11-22): dp4a for qkv 5.2 us (gemvT 5.5), o 3.5 (3.8), gate_up 11.2
    # (12.6); gemvT for down 6.6 and the head 60.0. Q8_0: gemvT everywhere (gate_up 17.0, head 96.0; dp4a
    # was never faster)
    (Q4_0, 1): {"vocab": ("gemvT", 16, 4), "wide": ("dp4a", 32, 4), "deep": ("gemvT", 4, 8),
                "narrow": ("dp4a", 8, 4), "mid": ("dp4a", 16, 4)},
    (Q8_0, 1): {"wide": ("gemvT", 8, 4), "deep": ("gemvT", 16, 4), "narrow": ("gemvT", 2, 4), "mid": ("gemvT", 4, 4)},
    # 2-4 rows (scripts/gpu/int8_sweep.py with ROWS=2,4, 2026-11-22; one program a row for gemvT and dp4a, the
    # repeated weights from L2): products a step at 4 rows Q4_0 955 us against 1,801 for gemvT everywhere,
    # Q8_0 1,249 against 1,948; at 2 rows 658 against 1,004 and 999 against 1,119
    (Q4_0, 2): ("dp4a", 16, 4),
    (Q8_0, 2): {"vocab": ("i8", 16, 64, 4, 4, 1), "wide": ("gemvT", 8, 4), "deep": ("gemvT", 16, 4),
                "narrow": ("gemvT", 16, 4), "mid": ("gemvT", 4, 4)},
    (Q4_0, 4): {"vocab": ("i8", 16, 64, 4, 4, 1), "wide": ("i8", 16, 128, 4, 4, 4), "deep": ("dp4a", 16, 4),
                "narrow": ("dp4a", 16, 4), "mid": ("dp4a", 16, 4)},
    (Q8_0, 4): {"vocab": ("i8", 16, 64, 4, 4, 1), "wide": ("i8", 16, 64, 4, 4, 1), "deep": ("gemvT", 8, 4),
                "narrow": ("gemvT", 16, 4), "mid": ("gemvT", 8, 4)},
    # 5-64 rows (2026-11-23, MMA=1 scripts/gpu/int8_sweep.py, experiment-mma-sweep-cuda-2026-11-23-*.json): the
    # int8 mma.sync kernels of driftwood.model.cuda.mma (("mma", warps a block, 8-row tiles a warp, PDL, 16-row
    # tiles of x a block)) where they measured faster than CONFIGS_BEFORE_MMA's choice by more than 3% (us in a
    # CUDA graph, the quantizing kernel included: before -> now); the small matrices stay on dequantize + cuBLAS
    # (the mma kernel streams a narrow matrix's few weight rows per block too slowly: qkv 18-29 us at 64 rows)
    (Q4_0, 8): {"vocab": ("mma", 4, 2, True, 1), "wide": ("mma", 4, 1, False, 4), "deep": ("mma", 4, 2, True, 4, 8),
                "narrow": ("mma", 4, 2, True, 2, 4), "mid": ("mma", 4, 2, True, 2, 4)},  # head 163 -> 84, gate_up 27.7 -> 18.7
    (Q4_0, 16): {"vocab": ("mma", 4, 2, True, 4), "wide": ("mma", 4, 1, False, 4), "deep": ("mm", 0),
                 "narrow": ("mm", 0), "mid": ("mm", 0)},  # head 178 -> 86, gate_up 27.1 -> 18.7
    (Q4_0, 32): {"vocab": ("mma", 4, 2, False, 2), "wide": ("mma", 4, 2, False, 4), "deep": ("mma", 8, 2, True, 2, 8),
                 "narrow": ("mma", 8, 2, True, 4, 8), "mid": ("mma", 8, 2, True, 4, 8)},  # head 184 -> 122, gate_up 34.2 -> 22.2
    (Q4_0, 64): {"vocab": ("mma", 4, 2, True, 4), "wide": ("mma", 4, 2, False, 4), "deep": ("mma", 4, 2, True, 2, 8),
                 "narrow": ("mma", 8, 2, True, 2, 4), "mid": ("mm", 0)},  # head 253 -> 181, gate_up 43.4 -> 31.8
    # Q8_0 8-16 rows: qkv 12.8 -> 11.4, o 10.7 -> 9.8, gate_up 27.1 -> 19.7, head 158 -> 109 (16: 13.0 -> 11.5,
    # 10.8 -> 9.7, 30.0 -> 19.9, 165 -> 112); 32: gate_up 34.1 -> 24.9, head 173 -> 126; 64: gate_up 35.3 -> 32.1
    (Q8_0, 8): {"vocab": ("mma", 2, 1, True, 4), "wide": ("mma", 2, 1, True, 1), "deep": ("mma", 4, 1, True, 2, 8),
                "narrow": ("mma", 4, 2, True, 2, 8), "mid": ("mma", 8, 2, True, 2, 8)},
    (Q8_0, 16): {"vocab": ("mma", 2, 1, True, 2), "wide": ("mma", 2, 1, True, 4), "deep": _Q8_16,
                 "narrow": ("mma", 2, 1, True, 1), "mid": ("mma", 2, 1, True, 4)},
    (Q8_0, 32): {"vocab": ("mma", 4, 2, True, 4), "wide": ("mma", 4, 2, True, 4), "deep": ("mma", 4, 2, True, 4, 8),
                 "narrow": ("mma", 4, 2, True, 2, 8), "mid": ("mma", 4, 2, True, 4, 4)},
    (Q8_0, 64): {"vocab": ("i8", 64, 128, 4, 5, 1), "wide": ("mma", 4, 2, True, 4), "deep": ("i8", 64, 128, 4, 5, 8),
                 "narrow": ("mm", 0), "mid": ("mma", 4, 2, True, 2, 4)},
}
# Fourteenth pass (2026-11-23, MMA=1 MMA_SPLITS=2,4,8 scripts/gpu/int8_sweep.py at 8, 32, 64 rows,
# experiment-mma-splits-cuda-2026-11-23.json): qkv, o and down through the mma kernel with the groups split among
# blocks (a sixth element: splits), where more than 3% faster than before (us, before -> now): Q4_0 8 rows qkv
# 15.5 -> 8.9, o 10.0 -> 6.9, down 24.5 -> 16.0; 32: 11.7 -> 9.7, 10.1 -> 8.4, 25.8 -> 16.0; 64: o 10.4 -> 9.7,
# down 26.5 -> 25.2 (qkv 12.2 -> 12.1 kept); Q8_0 8: 11.7 -> 8.4, 10.6 -> 7.0, 26.3 -> 14.6; 32: 12.7 -> 10.9,
# 10.5 -> 9.0, 27.1 -> 18.9; 64: qkv 13.1 -> 12.5 (o, down within 2%: kept). 16 rows not swept. The entries before
# (TritonOps(mma_splits=False)):
CONFIGS_BEFORE_SPLITS: dict[tuple[int, int], dict[str, tuple]] = {
    (Q4_0, 8): {"deep": ("mm", 0), "narrow": ("mm", 0), "mid": ("gemvT", 8, 4)},
    (Q4_0, 32): {"deep": ("mm", 0), "narrow": ("mm", 0), "mid": ("mm", 0)},
    (Q4_0, 64): {"deep": ("mm", 0), "narrow": ("mm", 0), "mid": ("mm", 0)},
    (Q8_0, 8): {"deep": _Q8_16, "narrow": ("mma", 2, 1, True, 4), "mid": ("mma", 2, 1, True, 4)},
    (Q8_0, 32): {"deep": ("i8", 32, 64, 4, 4, 4), "narrow": ("mm", 0), "mid": ("mm", 0)},
    (Q8_0, 64): {"narrow": ("mm", 0), "mid": ("mm", 0)},
}
# The 5-64-row entries before the mma kernels (the eighth pass's, scripts/gpu/int8_sweep.py 2026-11-22):
# int8 tensor-core dots in Triton for the wide matrices (Q4_0 at 64 rows: gate_up ~48 us against 55 for
# dequantize + cuBLAS, the head ~270 against 443; Q8_0 ~39 against 60, ~200 against 486), for Q8_0's down
# (25 against 30) and for all of Q8_0's at 5-16 rows; dequantize + cuBLAS for the other small ones (qkv 12,
# o 10 us), the whole-row kernel for Q4_0's qkv at 5-8 rows (it applies RMSNorm and RoPE itself). Measured
# and dropped (docs/gpu.md): Q4_0's nibbles read twice instead of joined, the offset term in the epilogue
# instead of signed codes, sub-blocks of 16 rows sharing a tile, two groups an iteration, the next group
# loaded ahead into registers. gate_up at 64 rows in two splits (I8_SPLITS=1,2,3,4: Q4_0 43.0 us against
# 45.6 with four, Q8_0 35.6 against 36.6 with one). TritonOps(mma=False) decodes with these.
CONFIGS_BEFORE_MMA: dict[tuple[int, int], dict[str, tuple]] = {
    (Q4_0, 8): {"vocab": ("i8", 16, 128, 4, 4, 4), "wide": ("i8", 16, 64, 4, 4, 1), "deep": ("mm", 0),
                "narrow": ("mm", 0), "mid": ("gemvT", 8, 4)},
    (Q8_0, 8): {"vocab": ("i8", 16, 64, 4, 4, 1), "wide": _Q8_16, "deep": _Q8_16, "narrow": _Q8_16, "mid": _Q8_16},
    (Q4_0, 16): {"vocab": ("i8", 16, 128, 4, 4, 4), "wide": ("i8", 16, 128, 4, 4, 4), "deep": ("mm", 0),
                 "narrow": ("mm", 0), "mid": ("mm", 0)},
    (Q8_0, 16): {"vocab": ("i8", 16, 64, 4, 4, 1), "wide": _Q8_16, "deep": _Q8_16, "narrow": _Q8_16, "mid": _Q8_16},
    (Q4_0, 32): {"vocab": ("i8", 32, 128, 4, 4, 1), "wide": ("i8", 32, 128, 4, 4, 4), "deep": ("mm", 0),
                 "narrow": ("mm", 0), "mid": ("mm", 0)},
    (Q8_0, 32): {"vocab": ("i8", 32, 128, 4, 4, 1), "wide": ("i8", 32, 128, 4, 4, 4), "deep": ("i8", 32, 64, 4, 4, 4),
                 "narrow": ("mm", 0), "mid": ("mm", 0)},
    (Q4_0, 64): {"vocab": ("i8", 64, 128, 4, 3, 1), "wide": ("i8", 64, 128, 4, 5, 2), "deep": ("mm", 0),
                 "narrow": ("mm", 0), "mid": ("mm", 0)},
    (Q8_0, 64): {"vocab": ("i8", 64, 128, 4, 5, 1), "wide": ("i8", 64, 128, 4, 5, 2), "deep": ("i8", 64, 128, 4, 5, 8),
                 "narrow": ("mm", 0), "mid": ("mm", 0)},
}
MAX_ROWS = 64


def shape_class(n: int, k: int) -> str:
    return ("vocab" if n >= 32768 else "wide" if n >= 8192 else "deep" if k >= 4096 else "narrow" if n <= 2048
            else "mid")


def pick_config(fmt: int, m: int, n: int = 0, k: int = 0, mma: bool = True, splits: bool = True) -> tuple:
    """The configuration for m rows of x against an (n, k) matrix (``mma=False``: as before the
    mma kernels, :data:`CONFIGS_BEFORE_MMA`; ``splits=False``: before the mma kernel split the
    groups among blocks, :data:`CONFIGS_BEFORE_SPLITS`)."""
    table = CONFIGS if mma else {**CONFIGS, **CONFIGS_BEFORE_MMA}
    keys = sorted(r for f, r in table if f == fmt)
    key = (fmt, next((r for r in keys if m <= r), keys[-1]))
    cfg = table[key]
    if not isinstance(cfg, dict):
        return cfg
    cls = shape_class(n, k)
    if mma and not splits and cls in CONFIGS_BEFORE_SPLITS.get(key, {}):
        return CONFIGS_BEFORE_SPLITS[key][cls]
    return cfg.get(cls) or cfg["wide" if cls == "vocab" else cls]


def fuses_norm(fmt: int, m: int, n: int = 0, k: int = 0, config: tuple | None = None) -> bool:
    """Whether :func:`gemv` can apply RMSNorm to x itself: one row of x per program."""
    cfg = config or pick_config(fmt, m, n, k)
    return cfg[0] in ("gemvT", "dp4a", "i8", "mma") if fmt != DENSE else (cfg[0] == 1 and not cfg[4])


def fuses_rope(fmt: int, m: int, n: int, k: int, config: tuple | None = None, head_dim: int = 64) -> bool:
    """Whether :func:`gemv` can put the QKV product through RoPE and into the cache itself: one
    row of x per program (gemvT, or the dense kernel with one row a block), blocks of an even
    number of rows dividing the head dimension."""
    cfg = config or pick_config(fmt, m, n, k)
    ok = (cfg[0] == 1 and not cfg[4]) if fmt == DENSE else cfg[0] in ("gemvT", "dp4a")
    bn = cfg[1]
    return ok and bn % 2 == 0 and head_dim % bn == 0
