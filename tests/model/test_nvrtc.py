"""The CUDA C++ one-row GEMV (driftwood.model.cuda.nvrtc) on a CUDA device: each fusion decode
uses against a float32 reference on fresh random inputs, every launch configuration, with and
without PDL, inside a CUDA graph, and the decode step built on it against the Triton and torch
steps. Skipped without a CUDA device (the benchmarks' sweep, scripts/gpu/cuda_gemv_sweep.py,
checks the Llama-3.2-1B shapes)."""

from __future__ import annotations

import pytest
import torch

from driftwood.model import load_model
from driftwood.model.cuda.decoder import GraphDecoder, TorchOps, TritonOps
from tests.model.conftest import TINY_LLAMA3

if not torch.cuda.is_available():  # one skip for the module, not one per parametrized case
    pytest.skip("needs a CUDA device", allow_module_level=True)

# (format, dtype, (warps, rows a group, warps a row) or the default, PDL)
LAUNCHES = [("dense", torch.bfloat16, None, False), ("dense", torch.bfloat16, (4, 1, 1), True),
            ("dense", torch.bfloat16, (8, 2, 2), True), ("dense", torch.bfloat16, (16, 1, 4), False),
            ("dense", torch.bfloat16, (2, 4, 1), True), ("dense", torch.float16, None, True),
            ("dense", torch.float16, (8, 2, 2), False)]
LAUNCHES += [(f, *launch) for f in ("q4_0", "q8_0") for launch in
             [(torch.bfloat16, None, True), (torch.bfloat16, (4, 2, 2), False), (torch.float16, (8, 1, 1), True),
              (torch.bfloat16, (16, 1, 1), True), (torch.bfloat16, (8, 4, 1), True),
              (torch.bfloat16, (8, 1, 1, 1), True), (torch.float16, (4, 2, 1, 1), False)]]  # looping blocks


# the sweep's random matrices and float32 references (it imports the Triton kernels: CUDA only)
from scripts.gpu.cuda_gemv_sweep import matrix, product_reference, rel  # noqa: E402


@pytest.mark.parametrize("n,k", [(300, 256), (64, 768), (1000, 2048), (200, 3072), (130, 8192)])
@pytest.mark.parametrize("mode", ["plain", "norm", "residual", "glu", "norm_f32"])
@pytest.mark.parametrize("fmt,dtype,config,pdl", LAUNCHES)
def test_products_match_float32(fmt, dtype, n, k, mode, config, pdl):
    """Dense weights, and Q4_0/Q8_0 codes in BlockLinear's layout (random codes and scales,
    dequantized in float32 for the reference)."""
    from driftwood.model.cuda import nvrtc

    f = {"dense": nvrtc.DENSE, "q4_0": nvrtc.Q4_0, "q8_0": nvrtc.Q8_0}[fmt]
    if config is not None and nvrtc.fit(f, k, config) != config:
        pytest.skip("K not divisible among the warps of a row, or too many loads a lane")
    g = torch.Generator(device="cuda").manual_seed(n * k)
    wk, _, w = matrix(n, k, f, g, dtype)
    x = torch.randn(1, 2 * k if mode == "glu" else k, device="cuda", generator=g).to(dtype)
    kw: dict = {}
    if mode.startswith("norm"):
        kw["norm"] = ((torch.rand(k, device="cuda", generator=g) + 0.5).to(dtype), 1e-5)
    if mode in ("residual", "glu"):
        kw["residual"] = torch.randn(1, n, device="cuda", generator=g).to(dtype)
    # decode hands it the products it is faster for (nvrtc.pick); it computes the rest as well
    assert nvrtc.supports(x, wk["weight"], glu=mode == "glu", fmt=f) == (nvrtc.pick(f, k, n) is not None)
    config = config or nvrtc.pick(f, k, n) or nvrtc.default_config(f, k)
    want = product_reference(w, x, glu=mode == "glu", **kw)
    if "residual" in kw:
        kw["residual"] = kw["residual"].clone()  # written in place where out is the residual
    got = nvrtc.gemv_row(x, **wk, glu=mode == "glu", out_dtype=torch.float32 if mode == "norm_f32" else None,
                         config=config, pdl=pdl, out=kw.get("residual"), **kw)
    assert got.shape == (1, n) and got.dtype == (torch.float32 if mode == "norm_f32" else dtype)
    assert rel(got, want) < (1e-4 if mode == "norm_f32" else 4e-3)


@pytest.mark.parametrize("fmt", ["q4_0", "q8_0"])
@pytest.mark.parametrize("config", [(4, 1, 1, 1), (8, 2, 1, 1), (16, 1, 1, 1)])
@pytest.mark.parametrize("n,k", [(40003, 2048), (20000, 256)])
def test_looping_blocks_take_every_tile(fmt, config, n, k):
    """Blocks that loop over tiles (the grid as many as are resident): more tiles than blocks,
    the last one partial; RMSNorm inside, float32 out, against float32; in a graph with PDL."""
    from driftwood.model.cuda import nvrtc

    f = {"q4_0": nvrtc.Q4_0, "q8_0": nvrtc.Q8_0}[fmt]
    if nvrtc.fit(f, k, config) != config:
        pytest.skip("too many loads a lane")
    g = torch.Generator(device="cuda").manual_seed(n + k)
    wk, _, w = matrix(n, k, f, g, torch.bfloat16)
    x = torch.randn(1, k, device="cuda", generator=g).bfloat16()
    norm = ((torch.rand(k, device="cuda", generator=g) + 0.5).bfloat16(), 1e-5)
    rows = config[0] * config[1]
    assert -(-n // rows) > 2 * torch.cuda.get_device_properties(0).multi_processor_count * (16 // config[0])
    out = torch.full((1, n), float("nan"), device="cuda")
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        nvrtc.gemv_row(x, **wk, norm=norm, out=out, config=config, pdl=True)
    for _ in range(2):
        x.copy_(torch.randn(1, k, device="cuda", generator=g))
        out.fill_(float("nan"))
        graph.replay()
        assert rel(out, product_reference(w, x, norm=norm)) < 1e-4


@pytest.mark.parametrize("config", [None, (8, 2, 1), (4, 4, 2), (16, 1, 1)])
def test_qkv_rope_writes_the_cache_at_pos(config):
    """RoPE in the QKV product's epilogue: queries returned, keys and values at pos only, as
    TorchOps.rope_store puts them (an odd rows-a-group count is made even)."""
    from driftwood.model.cuda import nvrtc

    H, HKV, D, cap, k, pos = 8, 2, 64, 40, 512, 33
    n = (H + 2 * HKV) * D
    g = torch.Generator(device="cuda").manual_seed(1)
    w = (torch.randn(n, k, device="cuda", generator=g) / k**0.5).bfloat16()
    x = torch.randn(1, k, device="cuda", generator=g).bfloat16()
    nw = (torch.rand(k, device="cuda", generator=g) + 0.5).bfloat16()
    p = torch.tensor([pos], device="cuda")
    inv = 1.0 / (10000.0 ** (torch.arange(0, D, 2, device="cuda").float() / D))
    kc, vc = (torch.zeros(1, HKV, cap, D, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    kr, vr = kc.clone(), vc.clone()
    q = nvrtc.gemv_row(x, w, norm=(nw, 1e-5), rope=(p, inv, kc, vc, H, HKV, D), config=config, pdl=True)
    qkv = product_reference(w.float(), x, norm=(nw, 1e-5)).bfloat16()
    qr = TorchOps().rope_store(qkv, p, inv, kr, vr, H, HKV, D)
    assert rel(q, qr) < 1e-2 and rel(kc[0, :, pos], kr[0, :, pos]) < 1e-2 and rel(vc[0, :, pos], vr[0, :, pos]) < 1e-2
    kc[0, :, pos] = 0
    vc[0, :, pos] = 0
    assert not kc.any() and not vc.any()


def test_captured_with_pdl_replays_new_inputs():
    """Launched through the driver on torch's stream, the kernel is captured like any other:
    a chain of PDL launches replayed with new x gives what eager launches give."""
    from driftwood.model.cuda import nvrtc

    g = torch.Generator(device="cuda").manual_seed(2)
    ws = [(torch.randn(512, 512, device="cuda", generator=g) / 512**0.5).bfloat16() for _ in range(4)]
    x = torch.randn(1, 512, device="cuda", generator=g).bfloat16()

    def chain():
        h = x
        for w in ws:
            h = nvrtc.gemv_row(h, w, residual=h.clone(), pdl=True)
        return h

    chain()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = chain()
    for seed in range(3):
        x.copy_(torch.randn(1, 512, device="cuda", generator=g.manual_seed(seed + 10)).bfloat16())
        graph.replay()
        torch.testing.assert_close(out, chain(), rtol=0, atol=0)


def test_unsupported_shapes_fall_back():
    from driftwood.model.cuda import nvrtc

    w = torch.zeros(64, 320, device="cuda", dtype=torch.bfloat16)  # K not a multiple of 256
    assert not nvrtc.supports(torch.zeros(1, 320, device="cuda", dtype=torch.bfloat16), w)
    w = torch.zeros(64, 256, device="cuda", dtype=torch.bfloat16)
    assert not nvrtc.supports(torch.zeros(2, 256, device="cuda", dtype=torch.bfloat16), w)  # two rows
    assert not nvrtc.supports(torch.zeros(1, 256, device="cuda"), w.float())  # float32


def test_step_with_the_cuda_kernel(tiny_gguf):
    """The BF16 decode step with every product through the CUDA kernel (the tiny Llama-3 shape:
    K of 256 and 512): graphs with PDL bit-identical to the eager step without, and within
    bfloat16 noise of the Triton step and of torch in float32."""
    from driftwood.model.cuda import nvrtc

    assert nvrtc.available()  # else the "CUDA" step below would be the Triton one
    m = load_model(str(tiny_gguf("bf16", TINY_LLAMA3)), device="cuda", dtype="bfloat16", progress=False)
    batch = m.new_batch(1, capacity=128)
    batch.prefill(0, [5, 17, 99, 3, 42])
    tokens, pos = [7], list(batch.positions)
    saved = batch.cache.k.clone(), batch.cache.v.clone()

    def run(ops, graphs):
        batch.cache.k.copy_(saved[0])
        batch.cache.v.copy_(saved[1])
        return GraphDecoder(m.transformer, batch.cache, graphs=graphs, ops=ops)(tokens, pos).clone()

    eager = run(TritonOps(cuda_pdl=False), graphs=False)
    for _ in range(2):
        torch.testing.assert_close(run(TritonOps(), graphs=True), eager, rtol=0, atol=0)
    assert rel(eager, run(TritonOps(cuda_gemv=False), graphs=False)) < 2e-2
    assert rel(eager, run(TorchOps(), graphs=False)) < 5e-2
