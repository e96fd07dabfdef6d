"""The memory bridge: one region shared by a Wasm guest and the accelerator.

- :mod:`~driftwood.memory.arena` — the page-aligned, never-moving mapping.
- :mod:`~driftwood.memory.creator` — Wasmtime's host memory creator, making every guest
  linear memory an arena.
- :mod:`~driftwood.memory.backends` — zero-copy device views (cpu, cuda).
"""

from driftwood.memory.arena import ALIGNMENT, Arena, ArenaListener, live_mappings

__all__ = ["ALIGNMENT", "Arena", "ArenaListener", "live_mappings"]
