"""Triton kernels against torch on tiny shapes; run with TRITON_INTERPRET=1 on the CPU (or on
CUDA). Used by test_batch.py and scripts/gpu_engine_check.py."""

from __future__ import annotations

import torch


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def int8_activations(x: torch.Tensor) -> torch.Tensor:
    """x (M, K) as the int8 kernels see it: each 32-column group rounded to multiples of
    max|group| / 127 (to nearest even), returned in float64."""
    g = x.float().reshape(x.shape[0], -1, 32)
    a = g.abs().amax(-1, keepdim=True)
    q = torch.round(g * torch.where(a > 0, 127 / a, 0))  # float32 throughout, as the kernels compute it
    return (q.double() * (a / 127).double()).reshape(x.shape)


def main(device: str = "cpu", tol: float = 1e-2, seed: int | None = None) -> dict[str, float]:
    """Fresh random inputs each call (``seed``: KERNEL_CHECK_SEED, else random; printed)."""
    import itertools
    import os

    import torch.nn.functional as F

    from driftwood.model.cuda import kernels as K
    from driftwood.model.cuda.decoder import TorchOps
    from driftwood.model.weights import BlockLinear

    if seed is None:
        seed = int(os.environ.get("KERNEL_CHECK_SEED") or int.from_bytes(os.urandom(4), "little"))
    print(f"kernel_check seed {seed}", flush=True)
    g = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=g).to(device)

    errs: dict[str, float] = {}
    M, N, Kd = 3, 40, 256
    x = randn(M, Kd).bfloat16()
    q4 = torch.randint(0, 16, (N, Kd // 32, 32), dtype=torch.uint8, generator=g)
    q8 = torch.randint(-128, 128, (N, Kd // 32, 32), dtype=torch.int8, generator=g)
    scales = (torch.rand(N, Kd // 32, generator=g) * 0.1).half().to(device)
    w4 = ((q4.float().to(device) - 8) * scales[..., None].float()).view(N, Kd)
    w8 = (q8.float().to(device) * scales[..., None].float()).view(N, Kd)
    c4 = BlockLinear.pack_q4_0(q4).to(device)
    c8 = BlockLinear.pack_q8_0(q8).to(device)
    wd = randn(N, Kd).bfloat16()
    for cfg in [("gemvT", 4, 4), ("gemvT", 16, 1), ("mm", 0)]:
        for name, fmt, codes, w in [("q4_0", K.Q4_0, c4, w4), ("q8_0", K.Q8_0, c8, w8)]:
            y = torch.full((M, N), float("nan"), dtype=x.dtype, device=device)  # poisoned
            K.gemv(x, fmt, codes, scales, out=y, config=cfg)
            errs[f"{name} {cfg}"] = rel(y, x.float() @ w.t())  # NaN (unwritten) never passes
    for (name, fmt, codes, w), dq in itertools.product([("q4_0", K.Q4_0, c4, w4), ("q8_0", K.Q8_0, c8, w8)],
                                                       [K.DEQUANT, (4, 128, 2), (16, 64, 4)]):
        d = K.dequantize(fmt, codes, scales, torch.full((N, Kd), float("nan"), device=device), config=dq)
        errs[f"dequantize {name} {dq} float32 (exact)"] = float((d - w).abs().max())
        d = K.dequantize(fmt, codes, scales, torch.full((N, Kd), float("nan"), dtype=torch.bfloat16, device=device),
                         config=dq)
        errs[f"dequantize {name} {dq} bfloat16"] = rel(d, w)
    for cfg in [(1, 4, 128, 4, False), (1, 2, 128, 2, False), (4, 4, 256, 4, False), (16, 16, 64, 4, True)]:
        errs[f"dense {cfg}"] = rel(K.gemv(x, K.DENSE, wd, None, config=cfg), x.float() @ wd.float().t())
    res = randn(M, N).bfloat16()
    xg = randn(M, 2 * Kd).bfloat16()
    h = F.silu(xg[:, :Kd].float()) * xg[:, Kd:].float()
    for fmt, codes, w in [(K.Q4_0, c4, w4), (K.Q8_0, c8, w8)]:
        for cfg in [("gemvT", 8, 4), ("mm", 0), ("mm", 0.01)]:  # 0.01 MB: chunks of 20 rows
            r = res.clone()
            y = K.gemv(xg, fmt, codes, scales, residual=r, glu=True, out=r, config=cfg)
            assert y.data_ptr() == r.data_ptr()
            errs[f"fmt {fmt} {cfg[0]} glu residual"] = rel(y, res.float() + h @ w.t())
        y = K.gemv(x, fmt, codes, scales, out_dtype=torch.float32)
        assert y.dtype == torch.float32
        int8 = "int8 " if K.pick_config(fmt, M, N, Kd)[0] in ("dp4a", "i8") else ""  # the configuration picked
        errs[f"{int8}fmt {fmt} float32 out"] = rel(y, x.float() @ w.t())
        y = torch.full((M, N), float("nan"), dtype=torch.float32, device=device)
        K.gemv(x, fmt, codes, scales, out=y, config=("mm", 0.01))
        errs[f"fmt {fmt} mm float32 out"] = rel(y, x.float() @ w.t())
    # int8 activations (dp4a for one row a program, int8 dots for blocks of rows, split along K
    # (3 splits of 8 groups: one shorter) or not): against float64 on the int8-rounded activations
    # (what is left is the output's rounding, ~1e-7 in float32, and a code off by one where a
    # rounding tie falls the other way, ~1e-4), and against float32 (the rounding of the
    # activations, ~0.5-1%: "int8" entries get twice the tolerance)
    for cfg in [("dp4a", 4, 4), ("dp4a", 2, 8), ("i8", 16, 16, 4, 0), ("i8", 16, 32, 4, 3, 3),
                ("i8", 64, 32, 4, 3, 4)]:
        M8 = 3 if cfg[0] == "dp4a" else 20  # the int8 dots: a 16-row block and a masked one
        x8, xg8, res8 = randn(M8, Kd).bfloat16(), randn(M8, 2 * Kd).bfloat16(), randn(M8, N).bfloat16()
        h8 = F.silu(xg8[:, :Kd].float()) * xg8[:, Kd:].float()  # quantized from float32 (not rounded first)
        wn8 = randn(Kd).bfloat16()
        hn8 = TorchOps().rms_norm(x8, wn8, 1e-5).float()
        for name, fmt, codes, w in [("q4_0", K.Q4_0, c4, w4), ("q8_0", K.Q8_0, c8, w8)]:
            y = torch.full((M8, N), float("nan"), dtype=torch.float32, device=device)
            K.gemv(x8, fmt, codes, scales, out=y, config=cfg)
            errs[f"{name} {cfg} on int8-rounded x"] = rel(y, int8_activations(x8) @ w.double().t())
            errs[f"int8 {name} {cfg}"] = rel(y, x8.float() @ w.t())
            r = res8.clone()
            K.gemv(xg8, fmt, codes, scales, residual=r, out=r, glu=True, config=cfg)
            errs[f"{name} {cfg} glu residual on int8-rounded x"] = rel(r, res8.double() + int8_activations(h8) @ w.double().t())
            # RMSNorm inside rounds to bfloat16 before quantizing (which the interpreter does not
            # round to nearest, so against the rounded reference this is not exact there)
            y = K.gemv(x8, fmt, codes, scales, norm=(wn8, 1e-5), config=cfg, out_dtype=torch.float32)
            errs[f"int8 {name} {cfg} rms_norm"] = rel(y, int8_activations(hn8) @ w.double().t())
    wn = randn(Kd).bfloat16()
    xf = x.float()  # RMSNorm fused into the product, against float32 throughout
    hn = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-5) * wn.float()
    for fmt, codes, w, cfg in [(K.Q4_0, c4, w4, ("gemvT", 8, 4)), (K.Q8_0, c8, w8, ("gemvT", 4, 4)),
                               (K.DENSE, wd, wd.float(), (1, 4, 128, 4, False))]:
        y = torch.full((M, N), float("nan"), dtype=torch.float32, device=device)
        K.gemv(x, fmt, codes, scales if fmt != K.DENSE else None, out=y, config=cfg, norm=(wn, 1e-5))
        errs[f"fmt {fmt} {cfg[0]} rms_norm fused"] = rel(y, hn @ w.t())
    # a row length that is not a power of two (the whole-row kernel masks the rest)
    K3 = 384
    x3 = randn(M, K3).bfloat16()
    sc3 = (torch.rand(N, K3 // 32, generator=g) * 0.1).half().to(device)
    q43 = torch.randint(0, 16, (N, K3 // 32, 32), dtype=torch.uint8, generator=g)
    w43 = ((q43.float().to(device) - 8) * sc3[..., None].float()).view(N, K3)
    for cfg in [("gemvT", 4, 4)]:
        y = K.gemv(x3, K.Q4_0, BlockLinear.pack_q4_0(q43).to(device), sc3, config=cfg, out_dtype=torch.float32)
        errs[f"q4_0 K={K3} {cfg}"] = rel(y, x3.float() @ w43.t())
    errs["rms_norm"] = rel(K.rms_norm(x, wn, 1e-5), TorchOps().rms_norm(x, wn, 1e-5))
    xs = randn(M, 2 * 1100).bfloat16()  # a row length that is not a multiple of the block
    errs["silu_mul"] = rel(K.silu_mul(xs), F.silu(xs[:, :1100].float()) * xs[:, 1100:].float())
    B, H, Hkv, D, cap = 3, 8, 2, 64, 600
    qkv = randn(B, (H + 2 * Hkv) * D).bfloat16()
    pos = torch.tensor([5, 0, 517], device=device)
    inv = (1.0 / 500000 ** (torch.arange(0, D, 2).float() / D)).to(device)
    kc, vc = randn(4, Hkv, cap, D).bfloat16(), randn(4, Hkv, cap, D).bfloat16()
    kc2, vc2 = kc.clone(), vc.clone()
    q1 = K.rope_store(qkv, pos, inv, kc[:B], vc[:B], H, Hkv, D)
    q2 = TorchOps().rope_store(qkv, pos, inv, kc2[:B], vc2[:B], H, Hkv, D)
    errs["rope q"], errs["rope k"] = rel(q1, q2), rel(kc, kc2)
    assert torch.equal(vc, vc2), "rope_store changed the values"
    split = K.attention(q1, kc[:B], vc[:B], pos)
    errs["attention"] = rel(split, TorchOps().attention(q1, kc[:B], vc[:B], pos))
    for cfg in [(16, 1), (128, 8)]:
        errs[f"attention {cfg}"] = rel(K.attention(q1, kc[:B], vc[:B], pos, config=cfg), split)
    # The splits combined in the split kernel (combine=True; adaptive, which runs only the splits
    # that hold keys and lets a single one write the output): the same arithmetic, bit for bit where
    # a row has one or two splits; with more the sum over splits may round in another order (on the
    # H100 4 of 300 random cases differed, by one bfloat16 rounding). The counters end at zero.
    counters = torch.zeros(B * Hkv, dtype=torch.int32, device=device)
    assert K.attention_splits(cap) == (4, 192)
    for p in (pos, torch.tensor([191, 192, 599], device=device)):
        two = K.attention(q1, kc[:B], vc[:B], p)
        n_splits = (p + 1 + 191) // 192
        for _ in range(2):
            for got in (K.attention(q1, kc[:B], vc[:B], p, combine=True),
                        K.attention(q1, kc[:B], vc[:B], p, adaptive=True, counters=counters)):
                assert not counters.any(), "the counters are left at zero"
                for b in range(B):
                    diff = (got[b].float() - two[b].float()).abs()
                    if n_splits[b] <= 2:
                        assert torch.equal(got[b], two[b]), f"row {b} at {int(p[b])}: {float(diff.max())}"
                    else:
                        assert bool((diff <= two[b].float().abs() * 2**-7 + 1e-6).all()), f"row {b}: {float(diff.max())}"
    assert int(((pos + 1 + 191) // 192).max()) == 3  # pos reaches three splits, the second vector four
    # RMSNorm, the QKV product, RoPE and the cache write in one kernel, against float32 torch
    Nq, Kq = (H + 2 * Hkv) * D, 256
    xq = randn(B, Kq).bfloat16()
    wq = randn(Kq).bfloat16()
    hq = TorchOps().rms_norm(xq, wq, 1e-5).float()  # the bfloat16 input the product sees, as unfused
    sq = (torch.rand(Nq, Kq // 32, generator=g) * 0.1).half().to(device)
    q4q = torch.randint(0, 16, (Nq, Kq // 32, 32), dtype=torch.uint8, generator=g)
    q8q = torch.randint(-128, 128, (Nq, Kq // 32, 32), dtype=torch.int8, generator=g)
    wdq = randn(Nq, Kq).bfloat16()
    for name, fmt, codes, sc, w, cfg in [
            ("q4_0", K.Q4_0, BlockLinear.pack_q4_0(q4q).to(device), sq,
             ((q4q.float().to(device) - 8) * sq[..., None].float()).view(Nq, Kq), ("gemvT", 8, 4)),
            ("q4_0 dp4a", K.Q4_0, BlockLinear.pack_q4_0(q4q).to(device), sq,
             ((q4q.float().to(device) - 8) * sq[..., None].float()).view(Nq, Kq), ("dp4a", 16, 4)),
            ("q8_0", K.Q8_0, BlockLinear.pack_q8_0(q8q).to(device), sq,
             (q8q.float().to(device) * sq[..., None].float()).view(Nq, Kq), ("gemvT", 4, 4)),
            ("dense", K.DENSE, wdq, None, wdq.float(), (1, 4, 128, 4, False))]:
        kf, vf = (torch.zeros(4, Hkv, cap, D, device=device) for _ in range(2))  # float32 reference
        qr = TorchOps().rope_store(hq @ w.t(), pos, inv, kf[:B], vf[:B], H, Hkv, D)
        kb, vb = torch.full_like(kc, float("nan")), torch.full_like(vc, float("nan"))
        qg = K.gemv(xq, fmt, codes, sc, config=cfg, norm=(wq, 1e-5), rope=(pos, inv, kb[:B], vb[:B], H, Hkv, D))
        rows = torch.arange(B, device=device)
        # the same bits as the product then rope_store
        ku, vu = torch.zeros_like(kc), torch.zeros_like(vc)
        qu = K.rope_store(K.gemv(xq, fmt, codes, sc, config=cfg, norm=(wq, 1e-5)), pos, inv, ku[:B], vu[:B], H, Hkv, D)
        assert torch.equal(qg, qu) and torch.equal(kb[rows, :, pos], ku[rows, :, pos]), name
        assert torch.equal(vb[rows, :, pos], vu[rows, :, pos]), name
        errs[f"qkv rope fused {name} q"] = rel(qg, qr)
        errs[f"qkv rope fused {name} k"] = rel(kb[rows, :, pos], kf[rows, :, pos])
        errs[f"qkv rope fused {name} v"] = rel(vb[rows, :, pos], vf[rows, :, pos])
        kb[rows, :, pos] = 0
        assert kb.isnan().sum() == kb.numel() - B * Hkv * D, "wrote outside the positions"
    # the fused QKV + RoPE kernel equals the unfused kernels bit for bit (asserted above); against
    # float32 its error is that of the bfloat16 RMSNorm (~1%, as "rms_norm" above) carried through
    # the product, so it gets twice the tolerance
    bad = {k: v for k, v in errs.items() if not v < (2 * tol if k.startswith(("qkv rope fused", "int8")) else tol)}
    assert not bad, bad
    return errs


if __name__ == "__main__":
    print(main())
