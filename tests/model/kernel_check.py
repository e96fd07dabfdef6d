"""Triton kernels against torch on tiny shapes; run with TRITON_INTERPRET=1 on the CPU (or on
CUDA). Used by test_batch.py and scripts/gpu_engine_check.py."""

from __future__ import annotations

import torch


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def main(device: str = "cpu", tol: float = 1e-2) -> dict[str, float]:
    import torch.nn.functional as F

    from driftwood.model.cuda import kernels as K
    from driftwood.model.cuda.decoder import TorchOps

    g = torch.Generator().manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=g).to(device)

    errs: dict[str, float] = {}
    M, N, Kd = 3, 40, 256
    x = randn(M, Kd).bfloat16()
    codes = torch.randint(0, 256, (N, Kd // 2), dtype=torch.uint8, generator=g).to(device)
    scales = (torch.rand(N, Kd // 32, generator=g) * 0.1).half().to(device)
    c = codes.view(N, Kd // 32, 16)
    w4 = ((torch.cat([c & 15, c >> 4], -1).float() - 8) * scales[..., None].float()).view(N, Kd)
    q8 = torch.randint(-127, 128, (N, Kd), dtype=torch.int8, generator=g).to(device)
    w8 = (q8.view(N, -1, 32).float() * scales[..., None].float()).view(N, Kd)
    wd = randn(N, Kd).bfloat16()
    for cfg in [(1, 4, 128, 4, False), (4, 4, 256, 4, False), (16, 16, 64, 4, True)]:
        errs[f"q4_0 {cfg}"] = rel(K.gemv(x, K.Q4_0, codes, scales, config=cfg), x.float() @ w4.t())
        errs[f"q8_0 {cfg}"] = rel(K.gemv(x, K.Q8_0, q8, scales, config=cfg), x.float() @ w8.t())
        errs[f"dense {cfg}"] = rel(K.gemv(x, K.DENSE, wd, None, config=cfg), x.float() @ wd.float().t())
    res = randn(M, N).bfloat16()
    xg = randn(M, 2 * Kd).bfloat16()
    want = res.float() + (F.silu(xg[:, :Kd].float()) * xg[:, Kd:].float()) @ w4.t()
    r = res.clone()
    y = K.gemv(xg, K.Q4_0, codes, scales, residual=r, glu=True, out=r)
    assert y.data_ptr() == r.data_ptr()
    errs["q4_0 glu residual"] = rel(y, want)
    wn = randn(Kd).bfloat16()
    errs["rms_norm"] = rel(K.rms_norm(x, wn, 1e-5), TorchOps().rms_norm(x, wn, 1e-5))
    B, H, Hkv, D, cap = 3, 8, 2, 64, 600
    qkv = randn(B, (H + 2 * Hkv) * D).bfloat16()
    pos = torch.tensor([5, 0, 517], device=device)
    inv = (1.0 / 500000 ** (torch.arange(0, D, 2).float() / D)).to(device)
    kc, vc = randn(4, Hkv, cap, D).bfloat16(), randn(4, Hkv, cap, D).bfloat16()
    kc2, vc2 = kc.clone(), vc.clone()
    q1 = K.rope_store(qkv, pos, inv, kc[:B], vc[:B], H, Hkv, D)
    q2 = TorchOps().rope_store(qkv, pos, inv, kc2[:B], vc2[:B], H, Hkv, D)
    errs["rope q"], errs["rope k"] = rel(q1, q2), rel(kc, kc2)
    assert torch.equal(vc, vc2)
    errs["attention"] = rel(K.attention(q1, kc[:B], vc[:B], pos), TorchOps().attention(q1, kc[:B], vc[:B], pos))
    bad = {k: v for k, v in errs.items() if not v < tol}
    assert not bad, bad
    return errs


if __name__ == "__main__":
    print(main())
