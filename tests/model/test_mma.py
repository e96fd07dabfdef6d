"""The int8 mma.sync products (driftwood.model.cuda.mma) and the embedding gather
(driftwood.model.cuda.nvrtc.embed) on a CUDA device. Each product is checked twice on fresh
random weights: against float64 on the same int8 activations emulated in torch (quantized per
32-column group as the kernel does: any slip in the fragment layout, the code offsets or the
scales shows as an O(1) error) and against float32 on unrounded activations (the error int8
activations cost). Skipped without a CUDA device."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

if not torch.cuda.is_available():  # one skip for the module, not one per parametrized case
    pytest.skip("needs a CUDA device", allow_module_level=True)

from scripts.gpu.cuda_gemv_sweep import matrix

from driftwood.model.cuda import kernels, mma, nvrtc
from driftwood.model.llama import rms_norm

FORMATS = {"q4_0": nvrtc.Q4_0, "q8_0": nvrtc.Q8_0}


def activations(x: torch.Tensor, mode: str, nw: torch.Tensor | None) -> torch.Tensor:
    """x' in float32 as the quantizer computes it (RMSNorm rounded as rms_norm rounds it)."""
    if mode.startswith("norm"):
        return rms_norm(x, nw, 1e-5).float()
    if mode == "glu":
        g, u = x.float().chunk(2, dim=-1)
        return F.silu(g) * u
    return x.float()


def int8_rounded(xf: torch.Tensor) -> torch.Tensor:
    """x' rounded to int8 per 32-column group by its largest magnitude, back in float32."""
    m, k = xf.shape
    v = xf.view(m, k // 32, 32)
    a = v.abs().amax(-1, keepdim=True)
    q = torch.round(v * torch.where(a > 0, 127.0 / a, torch.zeros_like(a)))
    return (q * (a / 127.0)).view(m, k)


CASES = [(rows, mode) for rows in (1, 5, 8, 16, 17, 40, 64) for mode in ("plain", "norm", "glu", "norm_f32")]


@pytest.mark.parametrize("fmt", list(FORMATS))
@pytest.mark.parametrize("rows,mode", CASES)
@pytest.mark.parametrize("config,pdl", [((2, 1), True), ((4, 2), False), ((8, 2), True), ((1, 4), True),
                                        ((2, 1, 1), True), ((4, 2, 2), False),
                                        ((2, 1, 4, 2), True), ((4, 1, 2, 4), False), ((4, 2, 4, 8), True)])
def test_gemm_matches_the_int8_reference(fmt, rows, mode, config, pdl):
    """(Configurations with a fourth element: the groups split among blocks, then summed.)"""
    f = FORMATS[fmt]
    n, k = (136, 8192) if mode == "glu" else (1000, 2048) if rows % 2 else (264, 512)
    if len(config) > 3 and (k // 32) % (16 * config[3]):
        pytest.skip("each split takes a multiple of 16 groups")
    g = torch.Generator(device="cuda").manual_seed(rows * 1000 + n)
    _, (_, codes, scales), w = matrix(n, k, f, g)
    x = torch.randn(rows, 2 * k if mode == "glu" else k, device="cuda", generator=g).bfloat16()
    nw = (torch.rand(k, device="cuda", generator=g) + 0.5).bfloat16()
    res = torch.randn(rows, n, device="cuda", generator=g).bfloat16() if mode == "glu" else None
    assert mma.supports(x, f, codes, glu=mode == "glu")
    out_dtype = torch.float32 if mode == "norm_f32" else torch.bfloat16
    out = torch.empty(rows, n, dtype=out_dtype, device="cuda") if res is None else res.clone()
    got = mma.gemm(x, f, codes, scales, config=config, norm=(nw, 1e-5) if mode.startswith("norm") else None,
                   glu=mode == "glu", residual=out if res is not None else None, out=out, pdl=pdl)
    assert got.data_ptr() == out.data_ptr() and got.shape == (rows, n) and got.dtype == out_dtype
    xf = activations(x, mode, nw)
    exact = int8_rounded(xf).double() @ w.double().t()
    plain = xf @ w.t()
    if res is not None:
        exact, plain = exact + res.double(), plain + res.float()
    err = (got.double() - exact).norm() / exact.norm()
    # bfloat16 output rounds at 2^-9; float32 output and float32 sums leave ~1e-6; RMSNorm's rsqrt may
    # differ from torch's in the last bit, moving a rounded activation by one step now and then
    assert err < (4e-3 if out_dtype == torch.bfloat16 else 2e-4 if mode == "plain" else 1e-3), err
    assert ((got.float() - plain).norm() / plain.norm()) < 2.5e-2  # what int8 activations cost


@pytest.mark.parametrize("fmt", list(FORMATS))
@pytest.mark.parametrize("config", [(4, 2), (2, 1, 4, 4), (2, 1, 4, 3)])  # 3 splits: 64 groups take 2
def test_gemm_in_a_graph_replays_new_inputs(fmt, config):
    f = FORMATS[fmt]
    g = torch.Generator(device="cuda").manual_seed(7)
    _, (_, codes, scales), w = matrix(2048, 2048, f, g)
    x = torch.zeros(64, 2048, device="cuda", dtype=torch.bfloat16)
    nw = torch.ones(2048, device="cuda", dtype=torch.bfloat16)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        mma.gemm(x, f, codes, scales, config=config, norm=(nw, 1e-5))
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = mma.gemm(x, f, codes, scales, config=config, norm=(nw, 1e-5))
    for seed in (1, 2):
        x.copy_(torch.randn(64, 2048, device="cuda", generator=torch.Generator(device="cuda").manual_seed(seed)))
        graph.replay()
        want = int8_rounded(activations(x, "norm", nw)).double() @ w.double().t()
        assert ((y.double() - want).norm() / want.norm()) < 4e-3


def test_gemv_dispatches_mma_configurations_and_falls_back():
    """kernels.gemv runs ("mma", ...) configurations through mma.gemm, and shapes it cannot take
    (K not a multiple of 512) through dequantize + cuBLAS, RMSNorm applied first."""
    g = torch.Generator(device="cuda").manual_seed(3)
    for k in (2048, 768):
        _, (f, codes, scales), w = matrix(256, k, nvrtc.Q4_0, g)
        x = torch.randn(24, k, device="cuda", generator=g).bfloat16()
        nw = (torch.rand(k, device="cuda", generator=g) + 0.5).bfloat16()
        assert mma.supports(x, f, codes) == (k % 512 == 0)
        y = kernels.gemv(x, f, codes, scales, norm=(nw, 1e-5), config=("mma", 4, 1, True))
        want = rms_norm(x, nw, 1e-5).float() @ w.t()
        assert ((y.float() - want).norm() / want.norm()) < 2.5e-2


def _table(qtype: str, vocab: int, dim: int, g: torch.Generator) -> torch.Tensor:
    """A random raw GGUF table (vocab, bytes a row), valid fp16 block scales."""
    if qtype in ("Q4_0", "Q8_0"):
        size = 18 if qtype == "Q4_0" else 34
        raw = torch.randint(0, 256, (vocab, dim // 32, size), dtype=torch.uint8, device="cuda", generator=g)
        d = (torch.rand(vocab, dim // 32, device="cuda", generator=g) * 0.1).half()
        raw[..., :2] = d.view(torch.uint8).view(vocab, dim // 32, 2)
        return raw.view(vocab, -1)
    dt = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}[qtype]
    return torch.randn(vocab, dim, device="cuda", generator=g).to(dt).view(torch.uint8)


@pytest.mark.parametrize("qtype", list(nvrtc.EMBED_FORMATS))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_embed_rows_equal_the_torch_gather(qtype, dtype):
    from gguf import GGMLQuantizationType

    from driftwood.model.gguf import dequantize_bytes

    g = torch.Generator(device="cuda").manual_seed(11)
    raw = _table(qtype, 300, 256, g)
    tokens = torch.tensor([0, 299, 17, 17, 150], device="cuda")
    assert nvrtc.embed_supports(qtype, 256, tokens, dtype)
    got = nvrtc.embed(raw, qtype, 256, tokens, dtype)
    want = dequantize_bytes(raw[tokens], GGMLQuantizationType[qtype], 256, torch.float32).to(dtype)
    assert torch.equal(got, want)
