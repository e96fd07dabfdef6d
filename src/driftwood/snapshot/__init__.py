"""Snapshots: portable KV caches and whole-actor state (docs/snapshot-format.md).

- :mod:`~driftwood.snapshot.format` — the manifest header, chunk files, digests, validation.
- :mod:`~driftwood.snapshot.store` — the :class:`Store` interface, :class:`DirectoryStore`
  (atomic writes) and :class:`MemoryStore` (host memory, pinned for CUDA).
- :mod:`~driftwood.snapshot.session` — saving and restoring one session, incrementally.
- :mod:`~driftwood.snapshot.actor` — whole actors: memory, globals, module, sessions;
  :mod:`~driftwood.snapshot.wasm` finds wasi-libc's run-once flag so ``_start`` can run again.
- :mod:`~driftwood.snapshot.sign` — HMAC signing; :mod:`~driftwood.snapshot.verify` — checking.
"""

from driftwood.snapshot.session import Restored, SaveReport, forget, restore_session, save_session
from driftwood.snapshot.store import DirectoryStore, MemoryStore, Store

__all__ = ["DirectoryStore", "MemoryStore", "Restored", "SaveReport", "Store", "forget", "restore_session",
           "save_session"]
