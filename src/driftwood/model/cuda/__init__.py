"""The GPU fast path: Triton kernels (:mod:`.kernels`) and the one-token step replayed as CUDA
graphs (:mod:`.decoder`). Imported lazily: torch without Triton never loads it. See docs/gpu.md."""
