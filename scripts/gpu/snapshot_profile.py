"""Where a CUDA session restore from host memory spends its time (issue 5's 1.3x bound):
4,096 tokens of a GGUF model restored from a pinned MemoryStore, against the engine's own copy
of the same bytes, then cProfile (host side) and torch.profiler (device side) of one restore.
Usage on the device machine: python scripts/gpu/snapshot_profile.py MODEL.gguf"""

from __future__ import annotations

import cProfile
import io
import pstats
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from driftwood.model import load_model
from driftwood.snapshot.session import load_session, save_session
from driftwood.snapshot.store import DirectoryStore, MemoryStore

N = 4096


def timed(fn) -> float:
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) * 1e3


def saved_session(path: str):
    """The model at ``path`` on CUDA, a session of N tokens on it, and that session saved as "s"
    in a new DirectoryStore: (model, session, store, its record)."""
    model = load_model(path, device="cuda", progress=False)
    ids = [(i * 7919) % 100000 + 5 for i in range(N)]
    live = model.new_session(capacity=N + 64, seed=0)
    logits = live.prefill(ids)
    store = DirectoryStore(Path(tempfile.mkdtemp()) / "s", create=True)
    save_session(store, "s", live, logits=logits)
    return model, live, store, store.manifest("s").sessions[0]


def main() -> int:
    model, live, store, rec = saved_session(sys.argv[1])
    memory = MemoryStore(pinned=True)
    memory.load(store, "s")
    state = {k: v.to("cpu").pin_memory() for k, v in live.kv_state().items()}

    def restore() -> float:
        target = model.new_session(capacity=N + 64, seed=1)
        ms = timed(lambda: load_session(memory, rec, model, into=target))
        target.close()
        return ms

    def engine_copy() -> float:
        target = model.new_session(capacity=N + 64, seed=1)
        ms = timed(lambda: target.load_kv_state(list(live.tokens), state))
        target.close()
        return ms

    for _ in range(3):
        restore()
    print("restore from memory, ms:", sorted(round(restore(), 3) for _ in range(7)))
    print("engine copy, ms:", sorted(round(engine_copy(), 3) for _ in range(7)))
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(5):
        restore()
    prof.disable()
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(18)
    print(out.getvalue())
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as p:
        restore()
    print(p.key_averages().table(sort_by="cuda_time_total", row_limit=12))
    return 0


if __name__ == "__main__":
    sys.exit(main())
