"""Driftwood: untrusted WebAssembly agents driving LLM inference, zero-copy across the sandbox.

Layout: ``memory`` (arena, Wasmtime memory creator, accelerator backends), ``runtime``
(actors, host ABIs), ``model`` (GGUF models in torch; knows nothing of Wasm), ``snapshot``,
``toolchain`` (building C guests), ``cli``, ``bench``.
"""

__version__ = "0.1.0"
