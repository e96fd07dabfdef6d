"""Snapshots: save and restore a session's state vs recomputing it (prefill).

For each context length: the time to save a session (chunked safetensors, fsync'd, in a
fresh directory store), to restore it into an empty session, and to recompute it with our
own prefill; the bytes stored; and restore time against ``bytes ÷ bandwidth`` measured in the
same run. Then the cost of saving again after 24 more tokens (incremental: only new chunks).

- CPU: restore maps the directory store's files (in the page cache), each page copied once
  into a buffer in L1, hashed with xxh3 there and streamed into the cache; bandwidth is a large
  torch copy.
  Reading the same files whole, unchecked (the page cache's own speed), and read and hashed
  into host buffers, are reported beside it.
- CUDA: restore is from host memory (a pinned :class:`MemoryStore`, checked once when loaded)
  into the CUDA cache; bandwidth is a pinned host-to-device copy. Restoring from the directory
  store (read, check, copy) is reported beside it.

Every restore is checked bit for bit against the session it was saved from.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

TARGETS = {"cpu_speedup_4096": 100.0, "cuda_speedup_4096": 10.0, "restore_vs_bandwidth": 1.3}
REFERENCES = {
    "llama.cpp restore speedup on this CPU (24, 256, 1024 tokens)": [6.1, 7.8, 16.3],
    "original prototype": "5.45x at 24 tokens, ~100x projected at 4096",
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    p.add_argument("--model", default=None, help="model name or GGUF path (default: smollm2)")
    p.add_argument("--dtype", help="compute dtype (default: float32 on the CPU, bfloat16 on CUDA)")
    p.add_argument("--contexts", default="24,256,1024,4096", help="context lengths in tokens")
    p.add_argument("--new-tokens", type=int, default=24, help="tokens added before the incremental save")
    p.add_argument("--repeat", type=int, default=5, help="timed restores per context (median)")
    p.add_argument("--store", help="where to put the stores (default: a temporary directory)")
    p.add_argument("--json", dest="json_path", help="where to write the JSON result")


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def bandwidth(device: str, nbytes: int = 256 << 20) -> dict[str, float]:
    """GB/s of the copy a restore is bound by: host memcpy (CPU), pinned host -> device (CUDA)."""
    import torch

    src = torch.empty(nbytes, dtype=torch.uint8, pin_memory=device.startswith("cuda"))
    src.fill_(1)
    dst = torch.empty(nbytes, dtype=torch.uint8, device=device)
    times = []
    for _ in range(6):
        _sync(device)
        t = time.perf_counter()
        dst.copy_(src, non_blocking=True)
        _sync(device)
        times.append(time.perf_counter() - t)
    return {"gbs": nbytes / min(times[1:]) / 1e9, "bytes": nbytes,
            "what": "pinned host -> device copy" if device.startswith("cuda") else "torch copy, host memory"}


def file_read_seconds(paths: list[Path], threads: int) -> float:
    """Seconds to read whole files (in the page cache) with one preadv each on ``threads``
    Python threads (preadv drops the GIL): what a restore from a directory store reads, at the
    kernel's page-cache copy speed, with nothing checked or placed. Best of five."""
    import threading

    fds = [os.open(p, os.O_RDONLY) for p in paths]
    try:
        bufs = [bytearray(os.fstat(fd).st_size) for fd in fds]

        def read(share: range) -> None:
            for i in share:
                os.preadv(fds[i], [bufs[i]], 0)

        best = float("inf")
        for _ in range(5):
            workers = [threading.Thread(target=read, args=(range(j, len(fds), threads),)) for j in range(threads)]
            t = time.perf_counter()
            for w in workers:
                w.start()
            for w in workers:
                w.join()
            best = min(best, time.perf_counter() - t)
        return best
    finally:
        for fd in fds:
            os.close(fd)


def verified_read_seconds(paths: list[Path]) -> float | None:
    """Seconds to read the same files whole and hash each with xxh3-128, as a restore must, with
    the native reader (one file a thread on torch's threads) into host buffers, nothing placed:
    what a restore from a directory store costs at least. Best of five; None without the
    native reader."""
    from driftwood.snapshot import native

    if native.module() is None:
        return None
    import torch

    fds = [os.open(p, os.O_RDONLY) for p in paths]
    try:
        files = [(fd, torch.empty(os.fstat(fd).st_size, dtype=torch.uint8)) for fd in fds]
        best = float("inf")
        for _ in range(5):
            t = time.perf_counter()
            native.read_files(files)
            best = min(best, time.perf_counter() - t)
        return best
    finally:
        for fd in fds:
            os.close(fd)


def _timed(fn: Any, device: str) -> float:
    _sync(device)
    t = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t


def _equal_state(a: Any, b: Any) -> bool:
    import torch

    ka, kb = a.kv_state(), b.kv_state()
    return (a.tokens == b.tokens and a.rng_state() == b.rng_state()
            and torch.equal(ka["k"], kb["k"]) and torch.equal(ka["v"], kb["v"]))


def run(args: argparse.Namespace) -> int:
    import torch

    from driftwood.bench.report import default_path, environment, format_table, progress, write_json
    from driftwood.model import load_model

    device = args.device
    contexts = [int(x) for x in args.contexts.split(",")]
    env = environment(device)
    load_start = os.getloadavg()
    progress(f"loading {args.model or 'smollm2'} on {device}")
    model = load_model(args.model or "smollm2", device=device, dtype=args.dtype, progress=False)
    cuda = device.startswith("cuda")
    bw = bandwidth(device)
    progress(f"bandwidth: {bw['gbs']:.1f} GB/s ({bw['what']})")
    capacity = max(contexts) + args.new_tokens
    gen = torch.Generator().manual_seed(0)
    all_ids = torch.randint(0, model.config.vocab_size, (capacity,), generator=gen).tolist()
    root = Path(args.store or tempfile.mkdtemp(prefix="driftwood-bench-snapshot-"))
    root.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    incremental: list[dict[str, Any]] = []
    try:
        for n in contexts:
            row, inc = measure(model, all_ids, n, capacity, args.new_tokens, args.repeat, root)
            rows.append(row)
            incremental.append(inc)
    finally:
        if not args.store:
            shutil.rmtree(root, ignore_errors=True)

    print(format_table(rows, [
        ("tokens", "tokens"), ("save_ms", "save ms"), ("restore_dir_ms", "restore dir ms"),
        ("restore_mem_ms", "restore mem ms"), ("restore_session_ms", "restore_session ms"),
        ("engine_copy_ms", "engine copy ms"), ("bytes", "bytes"),
        ("recompute_ms", "recompute ms"), ("speedup_dir", "speedup dir"), ("speedup_mem", "speedup mem"),
        ("bandwidth_ms", "bytes÷bw ms"), ("dir_vs_bandwidth", "dir÷(bytes÷bw)"),
        ("mem_vs_bandwidth", "mem÷(bytes÷bw)"), ("engine_copy_vs_bandwidth", "copy÷(bytes÷bw)"),
        ("file_read_ms", "file read ms"), ("dir_vs_file_read", "dir÷file read"),
        ("verified_read_ms", "read+xxh3 ms"), ("dir_vs_verified_read", "dir÷(read+xxh3)"), ("exact", "exact")]))
    print()
    print(format_table(incremental, [
        ("tokens", "on top of"), ("new_tokens", "new tokens"), ("save_ms", "save ms"),
        ("bytes_written", "bytes written"), ("objects_written", "objects written"),
        ("chunks_reused", "chunks reused")]))
    last = rows[-1]
    target = TARGETS["cuda_speedup_4096" if cuda else "cpu_speedup_4096"]
    result = {
        "bench": "snapshot",
        "environment": env,
        "model": {"file": model.path.name, "identity": model.identity, "dtype": str(model.dtype).removeprefix("torch."),
                  "layers": model.config.n_layers, "kv_heads": model.config.n_kv_heads,
                  "head_dim": model.config.head_dim, "kv_bytes_per_token": rows[0]["kv_bytes"] // rows[0]["tokens"]},
        "bandwidth": bw,
        "restore_from": {"headline": "host memory (pinned MemoryStore)" if cuda else "directory store",
                         "dir": "directory store: files in the page cache, " + (
                             "preadv into pinned staging" if cuda else
                             "mapped, each page hashed in L1 and copied with streaming stores") + ", every chunk's xxh3 checked",
                         "file_read": "the same chunk files read whole with one preadv each on torch's thread "
                                      "count of Python threads, nothing checked or placed (the page cache's speed)",
                         "verified_read": "the same chunk files read whole and each hashed with xxh3-128 by the "
                                          "native reader (preadv) on torch's threads into host buffers, "
                                          "nothing placed",
                         "mem": "MemoryStore: objects in host memory" + (" (pinned)" if cuda else "")
                         + ", checked once when loaded",
                         "session": "restore_session from the directory store: the manifest read and checked, "
                                    "a new session created (its KV cache allocated and zeroed), the restore"},
        "rows": rows,
        "incremental": incremental,
        "targets": {"speedup_at_max_context": target, "restore_vs_bandwidth": TARGETS["restore_vs_bandwidth"]},
        "met": {"speedup": last["speedup"] >= target if last["tokens"] >= 4096 else None,
                "restore_vs_bandwidth": last["restore_vs_bandwidth"] <= TARGETS["restore_vs_bandwidth"]},
        "references": REFERENCES,
        "load_average": {"start": load_start, "end": os.getloadavg()},
    }
    path = write_json(result, args.json_path or default_path("snapshot", device, env))
    print(f"wrote {path}")
    return 0 if all(r["exact"] for r in rows) else 1


def measure(model: Any, all_ids: list[int], n: int, capacity: int, new_tokens: int, repeat: int,
            root: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """One context length: (row, incremental-save row)."""
    from driftwood.bench.report import progress
    from driftwood.snapshot.session import load_session, restore_session, save_session
    from driftwood.snapshot.store import DirectoryStore, MemoryStore

    device = str(model.device)
    cuda = model.device.type == "cuda"
    import torch

    ids = all_ids[:n]
    # recompute at 1 thread and at torch's default: on a shared machine either may be the
    # faster by far, and the comparison is against our best prefill
    default_threads = torch.get_num_threads()
    by_threads = {}
    for threads in sorted({1, default_threads}) if not cuda else [default_threads]:
        torch.set_num_threads(threads)
        times = []
        for _ in range(3 if n <= 1024 else 1):
            fresh = model.new_session(capacity=capacity, seed=0)
            times.append(_timed(lambda: fresh.prefill(ids), device))  # noqa: B023 (called at once)
            fresh.close()
        by_threads[threads] = statistics.median(times)
    torch.set_num_threads(default_threads)
    best_threads = min(by_threads, key=by_threads.__getitem__)
    recompute_s = by_threads[best_threads]
    live = model.new_session(capacity=capacity, seed=0)
    logits = live.prefill(ids)
    progress(f"{n} tokens: prefill " + ", ".join(f"{v * 1e3:.1f} ms at {k} thread(s)" for k, v in by_threads.items()))

    saves = []
    for i in range(3):  # each into a fresh store: nothing to reuse
        store = DirectoryStore(root / f"ctx{n}-{i}", create=True)
        saves.append(save_session(store, "s", live, logits=logits).seconds)
    manifest = store.manifest("s")
    rec = manifest.sessions[0]
    stored = sum(o.size for o in manifest.objects()) + len(store.get_manifest("s"))
    kv_bytes = n * rec.kv.token_bytes
    memory = MemoryStore(pinned=cuda)  # host memory, checked once as it is loaded
    memory.load(store, "s")

    def restore(src: Any) -> tuple[float, bool]:
        target = model.new_session(capacity=capacity, seed=1)
        seconds = _timed(lambda: load_session(src, rec, model, into=target), device)
        exact = _equal_state(live, target)
        target.close()
        return seconds, exact

    def restore_whole() -> float:
        """What `driftwood resume` and restore_session pay for the session: the manifest read
        and checked, a new session created (its KV cache allocated and zeroed), the restore."""
        got = []
        seconds = _timed(lambda: got.append(restore_session(store, "s", model)), device)
        got[0].session.close()
        return seconds

    # the engine's own copy of the same keys and values from host memory into a fresh cache
    # (Session.load_kv_state): what any restore into this cache layout has to do at least
    state = {k: v.to("cpu").pin_memory() if cuda else v.to("cpu") for k, v in live.kv_state().items()}

    def engine_copy() -> float:
        target = model.new_session(capacity=capacity, seed=1)
        seconds = _timed(lambda: target.load_kv_state(list(live.tokens), state), device)
        target.close()
        return seconds

    chunk_files = [store.path(c.obj.key) for c in rec.chunks]
    for src in (store, memory):  # warm-up
        restore(src)
    samples = []  # interleaved, so that each ratio compares measurements taken together
    for _ in range(repeat):
        bw_s = kv_bytes / (bandwidth(device, max(kv_bytes, 64 << 20))["gbs"] * 1e9)
        d, e1 = restore(store)
        m_, e2 = restore(memory)
        read_s = file_read_seconds(chunk_files, torch.get_num_threads())
        checked_s = verified_read_seconds(chunk_files)
        samples.append((d, m_, engine_copy(), bw_s, read_s, e1 and e2, checked_s, restore_whole()))
    dir_s, mem_s, copy_s, bw_s, read_s = (statistics.median(x[i] for x in samples) for i in range(5))
    checked = None if samples[0][6] is None else statistics.median(x[6] for x in samples)
    headline = mem_s if cuda else dir_s
    row = {
        "tokens": n,
        "save_ms": statistics.median(saves) * 1e3,
        "restore_ms": headline * 1e3,
        "restore_dir_ms": dir_s * 1e3,
        "restore_mem_ms": mem_s * 1e3,
        "restore_session_ms": statistics.median(x[7] for x in samples) * 1e3,
        "engine_copy_ms": copy_s * 1e3,
        "bytes": stored,
        "kv_bytes": kv_bytes,
        "recompute_ms": recompute_s * 1e3,
        "recompute_threads": best_threads,
        "recompute_ms_by_threads": {str(k): v * 1e3 for k, v in by_threads.items()},
        "speedup": recompute_s / headline,
        "speedup_dir": recompute_s / dir_s,
        "speedup_mem": recompute_s / mem_s,
        "bandwidth_gbs": kv_bytes / bw_s / 1e9,
        "bandwidth_ms": bw_s * 1e3,
        "dir_vs_bandwidth": statistics.median(x[0] / x[3] for x in samples),
        "mem_vs_bandwidth": statistics.median(x[1] / x[3] for x in samples),
        "engine_copy_vs_bandwidth": statistics.median(x[2] / x[3] for x in samples),
        "file_read_ms": read_s * 1e3,
        "file_read_gbs": sum(c.obj.size for c in rec.chunks) / read_s / 1e9,
        "dir_vs_file_read": statistics.median(x[0] / x[4] for x in samples),
        "exact": all(x[5] for x in samples),
    }
    if checked is not None:
        row["verified_read_ms"] = checked * 1e3
        row["dir_vs_verified_read"] = statistics.median(x[0] / x[6] for x in samples)
    row["restore_vs_bandwidth"] = row["mem_vs_bandwidth" if cuda else "dir_vs_bandwidth"]
    progress(f"{n} tokens: save {row['save_ms']:.1f} ms, restore {row['restore_dir_ms']:.2f} ms (directory), "
             f"{row['restore_mem_ms']:.2f} ms (host memory), engine copy {row['engine_copy_ms']:.2f} ms, "
             f"{row['speedup']:.0f}x, exact={row['exact']}")

    # saving again after more tokens: only the new chunk, the logits and the manifest are written
    base = DirectoryStore(root / f"inc{n}", create=True)
    save_session(base, "s", live, logits=logits)
    more = live.prefill(all_ids[n : n + new_tokens])
    report = save_session(base, "s", live, logits=more)
    live.close()
    inc = {"tokens": n, "new_tokens": new_tokens, "save_ms": report.seconds * 1e3,
           "bytes_written": report.bytes_written, "objects_written": report.objects_written,
           "chunks_reused": report.objects_reused}
    return row, inc
