"""The one-token decode step as a fixed list of fused kernels, replayed as a CUDA graph.

:class:`DecodeStep` runs B sequences, each one token at its own position, over a static KV
cache: per layer RMSNorm, the QKV product, RoPE with the cache write, attention over each
row's ``pos + 1`` keys, the output product with the residual added, RMSNorm, the gate|up
product, and the down product that applies ``silu(gate) * up`` as it loads its input and adds
the residual: 8 kernels a layer with :class:`TritonOps`, 5 for one row, where
each RMSNorm runs inside the product that follows it (``fuse_norm``) and RoPE with the cache
write in the QKV product's epilogue (``fuse_rope``). :class:`TorchOps` computes the same
functions with torch operations (the CPU, and the reference in tests).

:class:`GraphDecoder` captures the step once per batch-size bucket (1, 2, 4, ... rows of the
cache) with the token ids and positions in a static device buffer, so a step costs one host
to device copy of 2 B integers (for one row: two stream memory writes) and one graph launch:
Python is off the critical path.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from driftwood.model.llama import apply_rope, rms_norm
from driftwood.model.weights import BlockLinear, DenseLinear

if TYPE_CHECKING:
    from driftwood.model.cache import KVCache
    from driftwood.model.llama import Transformer

log = logging.getLogger(__name__)

BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


def bucket(n: int) -> int:
    """The smallest captured batch size that holds ``n`` rows."""
    for b in BUCKETS:
        if n <= b:
            return b
    raise ValueError(f"at most {BUCKETS[-1]} sequences step together, not {n}")


class TorchOps:
    """The step's operations in plain torch: (M, ·) rows, any device."""

    def embed(self, embedding: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
        """Rows ``tokens`` (B,) of the token embeddings, (B, dim) in the compute dtype."""
        return embedding(tokens)

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        return rms_norm(x, weight, eps)

    def linear(self, x: torch.Tensor, layer: torch.nn.Module, *, residual: torch.Tensor | None = None,
               glu: bool = False, out_dtype: torch.dtype | None = None) -> torch.Tensor:
        if glu:
            gate, up = x.chunk(2, dim=-1)
            x = F.silu(gate) * up
        y = layer(x)
        if residual is not None:
            y = residual + y
        return y if out_dtype is None else y.to(out_dtype)

    def norm_linear(self, x: torch.Tensor, weight: torch.Tensor, eps: float, layer: torch.nn.Module, *,
                    out_dtype: torch.dtype | None = None) -> torch.Tensor:
        """``linear(rms_norm(x, weight, eps), layer)``."""
        return self.linear(self.rms_norm(x, weight, eps), layer, out_dtype=out_dtype)

    def qkv_rope(self, x, weight, eps, layer, pos, inv_freq, k_cache, v_cache, n_heads, n_kv_heads, head_dim):
        """``rope_store(norm_linear(x, weight, eps, layer), pos, ...)``: the rotated queries (B, H, D)."""
        qkv = self.norm_linear(x, weight, eps, layer)
        return self.rope_store(qkv, pos, inv_freq, k_cache, v_cache, n_heads, n_kv_heads, head_dim)

    def rope_store(self, qkv, pos, inv_freq, k_cache, v_cache, n_heads, n_kv_heads, head_dim):
        B = qkv.shape[0]
        angles = pos[:, None].float() * inv_freq  # (B, D/2)
        cos = angles.cos().repeat_interleave(2, dim=-1)[:, None].to(qkv.dtype)
        sin = angles.sin()
        sin = torch.stack([-sin, sin], dim=-1).flatten(-2)[:, None].to(qkv.dtype)
        qk = apply_rope(qkv[:, : (n_heads + n_kv_heads) * head_dim].view(B, -1, head_dim), cos, sin)
        rows = torch.arange(B, device=qkv.device)
        k_cache[rows, :, pos] = qk[:, n_heads:]  # (B, Hkv, D) at (row, :, pos[row])
        v_cache[rows, :, pos] = qkv[:, (n_heads + n_kv_heads) * head_dim :].view(B, n_kv_heads, head_dim)
        return qk[:, :n_heads]

    def attention(self, q, k_cache, v_cache, pos, counters=None):
        B, H, D = q.shape
        Hkv, cap = k_cache.shape[1], k_cache.shape[2]
        mask = torch.arange(cap, device=q.device)[None, :] <= pos[:, None]  # (B, cap)
        qf = q.view(B, Hkv, H // Hkv, D)  # query heads that share a KV head as query rows
        y = F.scaled_dot_product_attention(qf, k_cache[:B], v_cache[:B], attn_mask=mask[:, None, None])
        return y.reshape(B, H * D)


class TritonOps(TorchOps):
    """The step's operations as the Triton kernels of :mod:`driftwood.model.cuda.kernels`.

    ``dense``: how dense matrices run for more than one row, ``"cublas"`` (torch.mm, then the
    residual added) or ``"triton"`` (the gemv kernel); one row always takes the gemv kernel,
    whose fused residual and SiLU measured 1.34 against 1.43 ms/token (docs/gpu.md).
    ``fuse_rope``: RoPE and the cache write in the QKV product's epilogue where the product runs
    one row a program. ``pdl``: the Triton kernels launched with programmatic dependent launch.
    ``fuse_combine``: attention in one kernel, the splits combined by the last split program of
    each KV head (measured 15-40 us a token slower than the second kernel on the H100, so off).
    ``cuda_gemv``: one-row dense products through the CUDA C++ kernel of
    :mod:`driftwood.model.cuda.nvrtc` where it compiles and supports the shape (the Triton
    kernel otherwise); ``cuda_quant``: the one-row Q4_0 products too where that kernel measured
    faster (:func:`~driftwood.model.cuda.nvrtc.pick`); ``cuda_pdl``: those launched
    with programmatic dependent launch, their first weights requested while the previous kernel
    ends (BF16 1.22 -> 1.06 ms/token on the H100, Q4_0 0.699 -> 0.666; docs/gpu.md's twelfth pass).
    ``pdl_attention``: attention's two kernels launched with it too, so that the o product's
    weights are requested while attention ends (Q4_0 0.665 -> 0.639 ms/token; ``pdl``: every
    Triton kernel, which measured slower for Q8_0).
    ``mma``: Q4_0/Q8_0 products of 5-64 rows through the int8 ``mma.sync`` kernels of
    :mod:`driftwood.model.cuda.mma` (False: the Triton and cuBLAS choices before them,
    :data:`~driftwood.model.cuda.policy.CONFIGS_BEFORE_MMA`). ``cuda_embed``: the token
    embeddings gathered and dequantized in one CUDA kernel (:func:`~driftwood.model.cuda.nvrtc.embed`;
    torch's gather and dequantizing ops take 3 kernels for BF16 and 11 for Q4_0).
    ``adaptive_attention``: attention in one kernel that runs only the splits holding keys, a
    single one writing the output itself (False: every split, then the combine kernel).
    ``cuda_loop``: the one-row products configured with blocks that loop over tiles where they
    measured faster (Q4_0's gate|up and head; False:
    :data:`~driftwood.model.cuda.nvrtc.CONFIGS_BEFORE_LOOP`, the head on Triton).
    ``mma_splits``: qkv, o and down at 8, 32 and 64 rows through the mma kernel with the groups
    split among blocks where that measured faster (False:
    :data:`~driftwood.model.cuda.policy.CONFIGS_BEFORE_SPLITS`).
    """

    def __init__(self, dense: str = "cublas", fuse_norm: bool = True, fuse_rope: bool = True,
                 pdl: bool = False, fuse_combine: bool = False, cuda_gemv: bool = True,
                 cuda_quant: bool = True, cuda_pdl: bool = True, pdl_attention: bool = True, mma: bool = True,
                 cuda_embed: bool = True, adaptive_attention: bool = True, cuda_loop: bool = True,
                 mma_splits: bool = True) -> None:
        from driftwood.model.cuda import kernels, nvrtc

        self.k, self.nvrtc = kernels, nvrtc
        self.cuda_gemv, self.cuda_quant, self.cuda_pdl = cuda_gemv, cuda_quant, cuda_pdl
        self.pdl_attention = pdl_attention
        self.dense = dense
        self.fuse_norm = fuse_norm
        self.fuse_rope = fuse_rope
        self.pdl = pdl
        self.fuse_combine = fuse_combine
        self.mma = mma
        self.cuda_embed = cuda_embed
        self.adaptive_attention = adaptive_attention
        self.cuda_loop = cuda_loop
        self.mma_splits = mma_splits

    def _gemv_args(self, x, layer):
        """(fmt, codes, scales, configuration) when the gemv kernel runs this product, else None."""
        k, m = self.k, x.shape[0]
        if isinstance(layer, BlockLinear) and m <= k.MAX_ROWS:
            fmt = k.Q4_0 if layer.fmt == "q4_0" else k.Q8_0
            cfg = k.pick_config(fmt, m, layer.out_features, layer.in_features, mma=self.mma, splits=self.mma_splits)
            return fmt, layer.codes, layer.scales, cfg
        if isinstance(layer, DenseLinear) and (self.dense == "triton" or m == 1) and m <= k.MAX_ROWS:
            return k.DENSE, layer.weight, None, None
        return None

    def _row_kernel(self, x, layer, glu=False, rope=False) -> dict | None:
        """The weights for :func:`~driftwood.model.cuda.nvrtc.gemv_row` where the CUDA C++ one-row
        kernel runs this product, else None."""
        nv = self.nvrtc
        if isinstance(layer, DenseLinear) and self.cuda_gemv:
            kw = dict(weight=layer.weight, fmt=nv.DENSE, scales=None)
        elif isinstance(layer, BlockLinear) and self.cuda_quant:
            kw = dict(weight=layer.codes, fmt=nv.Q4_0 if layer.fmt == "q4_0" else nv.Q8_0, scales=layer.scales)
        else:
            return None
        if not nv.supports(x, kw["weight"], glu, kw["fmt"], rope, loop=self.cuda_loop):
            return None
        kw["config"] = nv.pick(kw["fmt"], nv.in_features(kw["fmt"], kw["weight"]), kw["weight"].shape[0], rope,
                               loop=self.cuda_loop)
        return kw

    def embed(self, embedding, tokens):
        nv, name = self.nvrtc, embedding.qtype.name
        if self.cuda_embed and nv.embed_supports(name, embedding.dim, tokens, embedding.dtype):
            return nv.embed(embedding.raw, name, embedding.dim, tokens, embedding.dtype)
        return super().embed(embedding, tokens)

    def rms_norm(self, x, weight, eps):
        return self.k.rms_norm(x, weight, eps, pdl=self.pdl)

    def linear(self, x, layer, *, residual=None, glu=False, out_dtype=None):
        if (w := self._row_kernel(x, layer, glu)) is not None:
            return self.nvrtc.gemv_row(x, **w, residual=residual, glu=glu, out=residual, out_dtype=out_dtype,
                                       pdl=self.cuda_pdl)
        args = self._gemv_args(x, layer)
        if args is not None:
            return self.k.gemv(x, *args[:3], residual=residual, glu=glu, out=residual, out_dtype=out_dtype,
                               pdl=self.pdl, config=args[3])
        if glu:  # SiLU · up in one kernel rounding once (torch takes two)
            x, glu = self.k.silu_mul(x), False
        if isinstance(layer, DenseLinear) and residual is not None and out_dtype is None:
            return torch.addmm(residual, x, layer.weight.t())  # the residual added in cuBLAS's epilogue
        return super().linear(x, layer, residual=residual, glu=glu, out_dtype=out_dtype)

    def norm_linear(self, x, weight, eps, layer, *, out_dtype=None):
        if self.fuse_norm and (w := self._row_kernel(x, layer)) is not None:
            return self.nvrtc.gemv_row(x, **w, norm=(weight, eps), out_dtype=out_dtype, pdl=self.cuda_pdl)
        args = self._gemv_args(x, layer)
        if self.fuse_norm and args is not None and self.k.fuses_norm(args[0], x.shape[0], args[1].shape[0], x.shape[1],
                                                                     config=args[3]):
            return self.k.gemv(x, *args[:3], out_dtype=out_dtype, norm=(weight, eps), pdl=self.pdl, config=args[3])
        return super().norm_linear(x, weight, eps, layer, out_dtype=out_dtype)

    def qkv_rope(self, x, weight, eps, layer, pos, inv_freq, k_cache, v_cache, n_heads, n_kv_heads, head_dim):
        w = self._row_kernel(x, layer, rope=True) if self.fuse_rope and self.fuse_norm else None
        if w is not None and k_cache.dtype == x.dtype and head_dim % 2 == 0:
            rope = (pos, inv_freq, k_cache, v_cache, n_heads, n_kv_heads, head_dim)
            return self.nvrtc.gemv_row(x, **w, norm=(weight, eps), rope=rope, pdl=self.cuda_pdl)
        args = self._gemv_args(x, layer)
        m, n, kd = x.shape[0], (n_heads + 2 * n_kv_heads) * head_dim, x.shape[1]
        if (self.fuse_rope and self.fuse_norm and args is not None and k_cache.dtype == x.dtype
                and self.k.fuses_norm(args[0], m, n, kd, config=args[3])
                and self.k.fuses_rope(args[0], m, n, kd, config=args[3], head_dim=head_dim)):
            rope = (pos, inv_freq, k_cache, v_cache, n_heads, n_kv_heads, head_dim)
            return self.k.gemv(x, *args[:3], norm=(weight, eps), rope=rope, pdl=self.pdl, config=args[3])
        return super().qkv_rope(x, weight, eps, layer, pos, inv_freq, k_cache, v_cache, n_heads, n_kv_heads,
                                head_dim)

    def rope_store(self, qkv, pos, inv_freq, k_cache, v_cache, n_heads, n_kv_heads, head_dim):
        return self.k.rope_store(qkv, pos, inv_freq, k_cache, v_cache, n_heads, n_kv_heads, head_dim, pdl=self.pdl)

    def attention(self, q, k_cache, v_cache, pos, counters=None):
        return self.k.attention(q, k_cache, v_cache, pos, pdl=self.pdl or self.pdl_attention, combine=self.fuse_combine,
                                adaptive=self.adaptive_attention, counters=counters)


class DecodeStep:
    """One token for each of B sequences: ``step(tokens, pos, k, v) -> logits (B, vocab)``
    float32, where tokens, pos are (B,) int64 on the device and k, v the KV cache tensors
    (n_layers, rows >= B, n_kv_heads, capacity, head_dim); row b's key and value are written
    at ``pos[b]`` and it attends to positions ``[0, pos[b]]``. Attention's counters (zero
    between calls) are the step's own, so that steps over different caches may run at once."""

    def __init__(self, transformer: Transformer, ops: TorchOps) -> None:
        self.t, self.ops = transformer, ops
        c = transformer.config
        self.dims = (c.n_heads, c.n_kv_heads, c.head_dim)
        self.counters: torch.Tensor | None = None
        self._replaced: list[torch.Tensor] = []

    def __call__(self, tokens: torch.Tensor, pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        t, ops = self.t, self.ops
        B = tokens.shape[0]
        if self.counters is None or self.counters.numel() < k.shape[1] * self.dims[1]:
            # one for each of the cache's rows and KV heads; a captured graph holds the address,
            # so one replaced (a larger cache) is kept
            if self.counters is not None:
                self._replaced.append(self.counters)
            self.counters = torch.zeros(k.shape[1] * self.dims[1], dtype=torch.int32, device=tokens.device)
        x = ops.embed(t.embed, tokens)  # (B, dim)
        for i, layer in enumerate(t.layers):
            q = ops.qkv_rope(x, layer.attn_norm, layer.eps, layer.attn.wqkv, pos, t.inv_freq, k[i, :B], v[i, :B],
                             *self.dims)  # (B, H, D); k, v written at pos
            a = ops.attention(q, k[i, :B], v[i, :B], pos, self.counters)  # (B, H D)
            x = ops.linear(a, layer.attn.wo, residual=x)
            gu = ops.norm_linear(x, layer.ffn_norm, layer.eps, layer.mlp.w13)  # (B, 2 ffn)
            x = ops.linear(gu, layer.mlp.w2, residual=x, glu=True)
        return ops.norm_linear(x, t.norm, t.config.norm_eps, t.output, out_dtype=torch.float32)


def default_ops(device: torch.device, dense: str = "cublas") -> TorchOps:
    return TritonOps(dense) if device.type == "cuda" else TorchOps()


def stream_write_value(device: torch.device):
    """``write(stream, address, value)``: the driver's ``cuStreamWriteValue64`` (a 64-bit value
    written to device memory in stream order, the value taken at the call), or None where the
    driver or device lacks it (checked once a device by writing and reading back)."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _WRITE_VALUE:
        _WRITE_VALUE[index] = _probe_write_value(torch.device("cuda", index))
    return _WRITE_VALUE[index]


_WRITE_VALUE: dict[int, object] = {}


def _probe_write_value(device: torch.device):
    import ctypes

    try:
        from torch.cuda._utils import _get_gpu_runtime_library

        fn = _get_gpu_runtime_library().cuStreamWriteValue64_v2
    except (ImportError, AttributeError, OSError):
        return None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_uint64, ctypes.c_uint64, ctypes.c_uint]
    fn.restype = ctypes.c_int

    def write(stream: int, address: int, value: int) -> None:
        rc = fn(stream, address, value, 0)
        if rc != 0:
            raise RuntimeError(f"cuStreamWriteValue64 failed (CUresult {rc})")

    probe = torch.full((2,), -1, dtype=torch.int64, device=device)
    try:
        with torch.cuda.device(device):
            write(torch.cuda.current_stream(device).cuda_stream, probe.data_ptr() + 8, 123456789012)
        ok = probe.tolist() == [-1, 123456789012]
    except RuntimeError as exc:
        log.info("stream memory operations unavailable (%s): decode copies its inputs", exc)
        return None
    return write if ok else None


class GraphDecoder:
    """Decode steps over one KV cache, each batch-size bucket captured as a CUDA graph on first
    use (``graphs=False``, or a CPU cache: the same step run eagerly).

    ``decoder(tokens, positions)`` steps rows ``[0, len(tokens))``; rows up to the bucket's
    size are padding (token 0 at position 0 of rows nobody uses). Returns the logits
    (len(tokens), vocab) float32 in a buffer that the next call overwrites.
    """

    def __init__(self, transformer: Transformer, cache: KVCache, *, graphs: bool = True,
                 ops: TorchOps | None = None, write_values: bool = True) -> None:
        self.cache = cache
        self.device = cache.k.device
        self.step = DecodeStep(transformer, ops or default_ops(self.device))
        self.graphs_enabled = graphs and self.device.type == "cuda"
        self.io = torch.zeros(2, cache.batch, dtype=torch.int64, device=self.device)  # tokens; positions
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.pool = None
        # one row's token and position written by two stream memory operations instead of a
        # host tensor and its copy (None: not available here)
        self.write_value = stream_write_value(self.device) if write_values and self.graphs_enabled else None
        self._index = self.device.index or 0
        self._raw_stream = getattr(torch._C, "_cuda_getCurrentRawStream", None) or (
            lambda i: torch.cuda.current_stream(i).cuda_stream)  # the fast one is torch's private API

    def __call__(self, tokens: Sequence[int], positions: Sequence[int]) -> torch.Tensor:
        n = len(tokens)
        if n == 1 and self.write_value is not None and 1 in self.graphs:
            graph, out = self.graphs[1]
            stream = self._raw_stream(self._index)
            at = self.io.data_ptr()
            self.write_value(stream, at, tokens[0])
            self.write_value(stream, at + 8 * self.cache.batch, positions[0])  # io[1, 0]
            graph.replay()
            return out
        rows = bucket(n) if self.graphs_enabled else n
        if rows > self.cache.batch:
            raise ValueError(f"{n} sequences do not fit the cache's {self.cache.batch} rows")
        pad = rows - n
        host = torch.tensor([list(tokens) + [0] * pad, list(positions) + [0] * pad], dtype=torch.int64)
        io = self.io[:, :rows]
        io.copy_(host, non_blocking=True)
        if not self.graphs_enabled:
            return self.step(io[0], io[1], self.cache.k, self.cache.v)
        if rows not in self.graphs:
            self.graphs[rows] = self._capture(rows)
            io.copy_(host)
        graph, out = self.graphs[rows]
        graph.replay()
        return out[:n]

    def _capture(self, rows: int) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        """Warm up (compiling the kernels) and capture the step for ``rows`` rows. The warm-up
        runs write at the last position of the rows; what was there is put back."""
        k, v = self.cache.k, self.cache.v
        saved = k[:, :rows, :, -1].clone(), v[:, :rows, :, -1].clone()
        io = self.io[:, :rows]
        io[0].fill_(0)
        io[1].fill_(self.cache.capacity - 1)
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(2):
                self.step(io[0], io[1], k, v)
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            out = self.step(io[0], io[1], k, v)
        self.pool = graph.pool()
        k[:, :rows, :, -1] = saved[0]
        v[:, :rows, :, -1] = saved[1]
        return graph, out
