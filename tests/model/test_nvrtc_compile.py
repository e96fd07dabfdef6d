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

from driftwood.model.cuda import nvrtc


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
            (256, 512, nvrtc.GLU | nvrtc.RES), (512, 256, nvrtc.NORM | nvrtc.OUT_F32)]


def _decode_kernels() -> list[str]:
    names = set()
    for fmt in (nvrtc.DENSE, nvrtc.Q4_0, nvrtc.Q8_0):
        for n, k, mode in PRODUCTS:
            cfg = nvrtc.pick(fmt, k, n)
            if cfg is None:
                continue
            warps, rpw, ksplit = cfg
            rpw += rpw % 2 if mode & nvrtc.ROPE else 0
            for dt in (0, 1):
                for pdl in (False, True):
                    names.add(nvrtc.kernel_name(fmt, dt, k, warps, rpw, ksplit, mode, pdl))
    return sorted(names)


@needs_nvrtc
def test_every_decode_kernel_compiles_without_spills():
    lib = ctypes.CDLL(str(LIB))
    names = _decode_kernels()
    assert any(n.startswith("qgemv_row<2") for n in names) and not any(n.startswith("qgemv_row<1") for n in names)
    cubin, lowered, log = nvrtc.compile_cubin(nvrtc.SOURCE, names, "90", lib, options=("--ptxas-options=-v",))
    assert cubin[:4] == b"\x7fELF" and set(lowered) == set(names)
    spills = [int(m) for m in re.findall(r"(\d+) bytes spill stores", log)]
    assert len(spills) == len(names) and not any(spills), log


@needs_nvrtc
def test_a_broken_source_reports_the_compiler_log():
    lib = ctypes.CDLL(str(LIB))
    with pytest.raises(nvrtc.CompileError, match=r"undeclared|undefined"):
        nvrtc.compile_cubin(nvrtc.SOURCE + "\n__global__ void broken() { not_declared(); }\n", ["broken"], "90", lib)


@given(fmt=st.sampled_from([nvrtc.DENSE, nvrtc.Q4_0, nvrtc.Q8_0]), k=st.integers(1, 64).map(lambda i: 256 * i))
def test_default_configurations_fit(fmt, k):
    """The configuration chosen for a shape nobody measured divides K among a row's warps and
    keeps a lane's quantized loads within the kernel's limit (8 x 16 bytes)."""
    warps, rpw, ksplit = nvrtc.default_config(fmt, k)
    assert warps % ksplit == 0 and rpw >= 1
    if fmt == nvrtc.DENSE:
        assert k % (256 * ksplit) == 0
    else:
        assert (k // 32) % ksplit == 0 and nvrtc.lane_loads(fmt, k, rpw, ksplit) <= 8


@needs_nvrtc
def test_without_pdl_they_compile_for_ampere():
    """sm_80 has no griddepcontrol: the kernels decode picks there (pdl_supported is False) compile."""
    names = [n for n in _decode_kernels() if n.endswith(", 0>")]
    _, lowered, _ = nvrtc.compile_cubin(nvrtc.SOURCE, names, "80", ctypes.CDLL(str(LIB)))
    assert set(lowered) == set(names)
