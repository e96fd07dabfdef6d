"""The CUDA C++ kernels of driftwood.model.cuda.nvrtc compiled for the H100 (sm_90) without a GPU:
NVRTC from the ``nvidia-cuda-nvrtc`` wheel (a dev dependency on x86-64 Linux). Every kernel
decode can choose for the Llama-3.2-1B shapes and the tiny test model compiles, without register
spills; a broken source gives the compiler's log; the launch policy's configurations always fit.
Running the kernels is tests/model/test_nvrtc.py's job (on a CUDA device)."""

from __future__ import annotations

import ctypes
import importlib.util
import re
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from driftwood.model.cuda import mma, nvrtc, policy


def _libnvrtc() -> Path | None:
    spec = importlib.util.find_spec("nvidia")
    for root in (spec.submodule_search_locations or []) if spec else []:
        for path in sorted(Path(root).glob("cu*/lib/libnvrtc.so*")):
            if "builtins" not in path.name:
                return path
    return None


LIB = _libnvrtc()
needs_nvrtc = pytest.mark.skipif(LIB is None, reason="needs the nvidia-cuda-nvrtc wheel")

# (N, K, MODE) of each product as decode runs it at one row: the 1B shapes and the tiny Llama-3 test model
NORM_ROPE = nvrtc.NORM | nvrtc.ROPE
PRODUCTS = [(3072, 2048, NORM_ROPE), (2048, 2048, nvrtc.RES), (16384, 2048, nvrtc.NORM),
            (2048, 8192, nvrtc.GLU | nvrtc.RES), (128256, 2048, nvrtc.NORM | nvrtc.OUT_F32),
            (768, 256, NORM_ROPE), (256, 512, nvrtc.RES), (1024, 256, nvrtc.NORM),
            (256, 512, nvrtc.GLU | nvrtc.RES), (512, 256, nvrtc.NORM | nvrtc.OUT_F32),
            # other widths: Llama-3.2-3B (3072), Qwen2.5-7B's down (18944), 2304, and QKV products with
            # RoPE at K = 5120 and 8192 (13B / 70B), where pairing rows needs more warps a row
            (5120, 3072, NORM_ROPE), (3072, 8192, nvrtc.GLU | nvrtc.RES), (3584, 18944, nvrtc.GLU | nvrtc.RES),
            (2304, 2304, nvrtc.RES), (7168, 5120, NORM_ROPE), (10240, 8192, NORM_ROPE)]


def _decode_kernels(pdl: tuple[bool, ...] = (False, True)) -> list[str]:
    """Every kernel decode picks for PRODUCTS (with and without the looping blocks)."""
    names = set()
    for fmt in (nvrtc.DENSE, nvrtc.Q4_0, nvrtc.Q8_0):
        for n, k, mode in PRODUCTS:
            for loop in (True, False):
                cfg = nvrtc.pick(fmt, k, n, rope=bool(mode & nvrtc.ROPE), loop=loop)
                if cfg is None:
                    continue
                for dt in (0, 1):
                    for p in pdl:
                        names.add(nvrtc.kernel_name(fmt, dt, k, *cfg[:3], mode, p, *cfg[3:]))
    return sorted(names)


@needs_nvrtc
def test_every_decode_kernel_compiles_without_spills():
    """(A few bytes are allowed: the dense QKV kernel at K = 5120 / 8192 spills 4-8.)"""
    lib = ctypes.CDLL(str(LIB))
    names = _decode_kernels()
    assert any(n.startswith("qgemv_row<2") for n in names) and not any(n.startswith("qgemv_row<1") for n in names)
    assert any(n.endswith(", 1, 1>") for n in names)  # looping blocks
    cubin, lowered, log = nvrtc.compile_cubin(nvrtc.SOURCE, names, "90", lib, options=("--ptxas-options=-v",))
    assert cubin[:4] == b"\x7fELF" and set(lowered) == set(names)
    spills = [int(m) for m in re.findall(r"(\d+) bytes spill stores", log)]
    assert len(spills) == len(names) and max(spills) <= 8, log


@needs_nvrtc
def test_a_broken_source_reports_the_compiler_log():
    lib = ctypes.CDLL(str(LIB))
    with pytest.raises(nvrtc.CompileError, match=r"undeclared|undefined"):
        nvrtc.compile_cubin(nvrtc.SOURCE + "\n__global__ void broken() { not_declared(); }\n", ["broken"], "90", lib)


@given(fmt=st.sampled_from([nvrtc.DENSE, nvrtc.Q4_0, nvrtc.Q8_0]), k=st.integers(1, 96).map(lambda i: 256 * i),
       n=st.sampled_from([256, 2048, 3072, 16384, 128256]), rope=st.booleans())
def test_chosen_configurations_fit(fmt, k, n, rope):
    """Whatever the shape, the configuration decode would launch divides K among a row's warps
    (256 columns a slice), pairs rows for RoPE, and keeps a lane's quantized loads within 8 x 16
    bytes (both sets a looping block holds); dense products always have one, Q8_0 never (Triton
    runs it), nor a Q4_0 vocabulary head unless configured."""
    cfg = nvrtc.pick(fmt, k, n, rope)
    if fmt == nvrtc.DENSE:
        assert cfg is not None
    if fmt == nvrtc.Q8_0 or (fmt == nvrtc.Q4_0 and n >= nvrtc.VOCAB_ROWS and (fmt, k, n) not in nvrtc.CONFIGS):
        assert cfg is None
    if cfg is not None:
        warps, rpw, ksplit = cfg[:3]
        loop = len(cfg) > 3 and cfg[3]
        assert warps % ksplit == 0 and k % (256 * ksplit) == 0 and rpw >= 1
        assert not rope or rpw % 2 == 0
        assert not loop or (fmt != nvrtc.DENSE and ksplit == 1 and not rope)
        assert fmt == nvrtc.DENSE or (2 if loop else 1) * nvrtc.lane_loads(fmt, k, rpw, ksplit) <= 8


@needs_nvrtc
def test_without_pdl_they_compile_for_ampere():
    """sm_80 has no griddepcontrol: the kernels decode picks there (pdl_supported is False) compile."""
    names = _decode_kernels(pdl=(False,))
    _, lowered, _ = nvrtc.compile_cubin(nvrtc.SOURCE, names, "80", ctypes.CDLL(str(LIB)))
    assert set(lowered) == set(names)


def _mma_kernels() -> list[str]:
    """Every mma kernel the policy picks at 5-64 rows for PRODUCTS' shapes (as decode fuses them:
    RMSNorm into qkv, gate|up and the head, SiLU · up and the residual into down, the residual into
    o), with and without the split products, both dtypes."""
    names = set()
    for fmt in (nvrtc.Q4_0, nvrtc.Q8_0):
        for rows in (5, 8, 9, 16, 17, 32, 33, 64):
            for n, k, mode in PRODUCTS:
                if mode & nvrtc.ROPE:
                    mode = nvrtc.NORM  # RoPE runs as its own kernel after an mma product
                for splits in (True, False):
                    cfg = policy.pick_config(fmt, rows, n, k, splits=splits)
                    if cfg[0] != "mma" or k % 512:
                        continue
                    wn, nt, _, mt, ksplit = mma.plan(rows, k, (cfg[1], cfg[2], *cfg[4:]))
                    pdl = cfg[3]
                    for dt in (0, 1):
                        names.update(mma.kernel_names(fmt, dt, rows, mode, wn, nt, pdl, mt, ksplit))
    return sorted(names)


@needs_nvrtc
def test_every_mma_kernel_the_policy_picks_compiles_without_spills():
    names = _mma_kernels()
    assert any(n.startswith("split_sum") for n in names) and any(n.startswith("qgemm_mma<2") for n in names)
    cubin, lowered, log = nvrtc.compile_cubin(mma.SOURCE, names, "90", ctypes.CDLL(str(LIB)),
                                              options=("--ptxas-options=-v",))
    assert cubin[:4] == b"\x7fELF" and set(lowered) == set(names)
    spills = [int(m) for m in re.findall(r"(\d+) bytes spill stores", log)]
    assert len(spills) == len(names) and max(spills) == 0, log
