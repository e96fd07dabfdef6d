"""Where a CUDA session restore from a directory store spends its time (issue 5's 1.3x bound):
4,096 tokens of a GGUF model saved to a DirectoryStore, then each part of the restore on its
own, the reads with the payload copies queued by the reading threads in several step sizes, and
the restore (load_session) with those step sizes, then where one restore's time goes.
Usage on the device machine: python scripts/gpu/snapshot_dir_profile.py MODEL.gguf OUT.json
(rendered into docs/snapshot-format.md as bench:restore-profile)."""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from scripts.gpu.snapshot_profile import N, saved_session

from driftwood.bench.report import environment
from driftwood.snapshot import native
from driftwood.snapshot import session as snap
from driftwood.snapshot.format import ChunkHeaders
from driftwood.snapshot.store import DirectoryStore


def timed(fn, repeat: int = 9) -> dict[str, float]:
    fn()
    fn()
    times = []
    for _ in range(repeat):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
    return {"median_ms": statistics.median(times), "min_ms": min(times)}


def main() -> int:
    model, live, store, rec = saved_session(sys.argv[1])
    paths = [store.path(c.obj.key) for c in rec.chunks]
    fds = [os.open(p, os.O_RDONLY) for p in paths]
    sizes = [os.fstat(fd).st_size for fd in fds]
    total = sum(sizes)
    offsets = [sum(sizes[:i]) for i in range(len(sizes))]
    pageable = torch.empty(total, dtype=torch.uint8)
    pinned = torch.empty(total, dtype=torch.uint8, pin_memory=True)
    device = torch.empty(total, dtype=torch.uint8, device="cuda")
    rows: dict[str, dict[str, float]] = {}

    def files(buf):
        return [(fd, buf[o : o + n]) for fd, o, n in zip(fds, offsets, sizes, strict=True)]

    def h2d_files():
        for o, n in zip(offsets, sizes, strict=True):
            device[o : o + n].copy_(pinned[o : o + n], non_blocking=True)

    def streamed(step: int):
        payloads = [native.Payload(device[o : o + n], 0, n) for o, n in zip(offsets, sizes, strict=True)]

        def run():
            native.read_files_to_gpu(files(pinned), payloads, native.cuda_driver(torch.device("cuda")), step)
        return run

    def restore():  # new_session included (~0.1 ms, see the breakdown)
        target = model.new_session(capacity=N + 64, seed=1)
        snap.load_session(store, rec, model, into=target)
        target.close()

    variants = {
        "read+xxh3 into pageable memory": lambda: native.read_files(files(pageable)),
        "read+xxh3 into pinned memory": lambda: native.read_files(files(pinned)),
        "host-to-device, one copy": lambda: device.copy_(pinned, non_blocking=True),
        "host-to-device, a copy a file": h2d_files,
        "read, then a copy a file": lambda: (native.read_files(files(pinned)), h2d_files()),
        **{f"reads queuing their copies, {step >> 20} MiB steps": streamed(step)
           for step in (1 << 20, 4 << 20, 16 << 20)},
        "reads queuing their copies at each file's end": streamed(1 << 62),
    }
    for name, fn in variants.items():
        device.zero_()
        rows[name] = timed(fn)
        print(f"{name:45s} {rows[name]['median_ms']:8.3f} ms (min {rows[name]['min_ms']:.3f})", flush=True)
        if "queuing" in name:
            assert torch.equal(device.cpu(), pageable), name  # every file's bytes on the device
    target = model.new_session(capacity=N + 64, seed=1)
    snap.load_session(store, rec, model, into=target)
    assert all(torch.equal(target.kv_state()[k], live.kv_state()[k]) for k in ("k", "v")), "restore differs"
    target.close()
    for step in (1 << 20, 4 << 20, 16 << 20, 1 << 62):
        snap.STREAM_STEP = step
        name = f"load_session, {'copies at each file end' if step == 1 << 62 else f'{step >> 20} MiB steps'}"
        rows[name] = timed(restore)
        print(f"{name:45s} {rows[name]['median_ms']:8.3f} ms (min {rows[name]['min_ms']:.3f})", flush=True)
    # as `driftwood bench snapshot` samples it: each restore right after something else
    from driftwood.bench.snapshot import bandwidth, file_read_seconds, verified_read_seconds

    snap.STREAM_STEP = 4 << 20
    for label, before in (("after a bandwidth measurement", lambda: bandwidth("cuda", total)),
                          ("after reading the files on Python threads",
                           lambda: file_read_seconds(paths, torch.get_num_threads())),
                          ("after the native read alone", lambda: verified_read_seconds(paths)),
                          ("after a 20 ms sleep", lambda: time.sleep(0.02)),
                          ("after a 20 ms sleep, threads not woken first", lambda: time.sleep(0.02))):
        snap.WAKE_THREADS = "not woken" not in label
        times = []
        for _ in range(9):
            before()
            target = model.new_session(capacity=N + 64, seed=1)
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            snap.load_session(store, rec, model, into=target)
            torch.cuda.synchronize()
            times.append((time.perf_counter() - t0) * 1e3)
            target.close()
        name = f"load_session, 4 MiB steps, {label}"
        rows[name] = {"median_ms": statistics.median(times), "min_ms": min(times)}
        print(f"{name:45s} {rows[name]['median_ms']:8.3f} ms (min {rows[name]['min_ms']:.3f})", flush=True)
    snap.WAKE_THREADS = True
    # where one restore's time goes (host clock; finish includes the final synchronize)
    spent: dict[str, float] = {}

    def clocked(owner, attr, label):
        real = getattr(owner, attr)

        def call(*args, **kwargs):
            t = time.perf_counter()
            try:
                return real(*args, **kwargs)
            finally:
                spent[label] = spent.get(label, 0.0) + (time.perf_counter() - t) * 1e3
        static = isinstance(getattr(owner, "__dict__", {}).get(attr), staticmethod)
        setattr(owner, attr, staticmethod(call) if static else call)

    for owner, attr, label in (
            (DirectoryStore, "reader", "open files"), (ChunkHeaders, "__call__", "expected headers"),
            (native, "cuda_driver", "driver entry points"), (snap._ChunkLoader, "_payload", "payload slices"),
            (snap._ChunkLoader, "_check_digest", "check digests"), (snap._ChunkLoader, "_staged", "record event"),
            (native, "wake", "wake threads"), (snap._ChunkLoader, "_staging", "staging buffer"),
            (native, "read_files_to_gpu", "read_files_to_gpu"), (snap._ChunkLoader, "_raw", "device buffer"),
            (snap._ChunkLoader, "_check_header", "check headers"), (snap._ChunkLoader, "_check_ids", "check ids"),
            (snap, "_load_logits", "logits"), (snap._ChunkLoader, "finish", "finish (scatter, sync)"),
            (snap._ChunkLoader, "load_all", "load_all"), (snap, "load_session", "load_session"),
            (model, "new_session", "new_session")):
        clocked(owner, attr, label)
    for step in (4 << 20, 1 << 62):
        snap.STREAM_STEP = step
        for _ in range(3):
            restore()
        spent.clear()
        for _ in range(10):
            restore()
        name = f"breakdown, {'copies at each file end' if step == 1 << 62 else f'{step >> 20} MiB steps'}"
        rows[name] = {k: v / 10 for k, v in spent.items()}
        print(name, {k: round(v, 3) for k, v in rows[name].items()}, flush=True)
    out = {"bench": "restore-profile", "environment": environment("cuda"), "model": Path(sys.argv[1]).name,
           "tokens": N, "bytes": total, "files": len(sizes), "rows": rows}
    Path(sys.argv[2]).write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
