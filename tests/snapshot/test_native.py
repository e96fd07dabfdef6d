"""The native chunk reader (driftwood/snapshot/native): bytes placed where the Python reader
puts them, digests equal to python-xxhash's, short files and bad arguments refused, and a
restore through it equal to one through the Python path."""

from __future__ import annotations

import contextlib
import errno
import os
import threading
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch
import xxhash
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from driftwood.errors import SnapshotError
from driftwood.snapshot import native
from driftwood.snapshot.session import restore_session, save_session
from driftwood.snapshot.store import DirectoryStore, MemoryStore
from tests.snapshot.conftest import prompt, reader

pytestmark = pytest.mark.skipif(native.module() is None, reason="the native snapshot reader could not be built here")

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@st.composite
def layouts(draw):
    """A cache shape, a batch row and consecutive chunks [start, start + count) inside it."""
    L, B, H, D = draw(st.integers(1, 4)), draw(st.integers(1, 3)), draw(st.integers(1, 4)), draw(st.sampled_from([1, 4, 64, 80]))
    counts = draw(st.lists(st.integers(1, 300), min_size=1, max_size=5))
    capacity = sum(counts) + draw(st.integers(0, 40))
    starts = np.cumsum([0, *counts[:-1]]).tolist()
    return (L, B, H, capacity, D), draw(st.integers(0, B - 1)), draw(st.sampled_from(DTYPES)), list(zip(starts, counts, strict=True))


def payload(L: int, H: int, D: int, count: int, dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    """A chunk's k and v, (2, L, H, count, D), of random bits."""
    n = 2 * L * H * count * D * torch.finfo(dtype).bits // 8
    return torch.randint(0, 256, (n,), dtype=torch.uint8, generator=gen).view(dtype).view(2, L, H, count, D)


def expected_cache(shape, row, dtype, chunks, payloads) -> tuple[torch.Tensor, torch.Tensor]:
    k, v = torch.zeros(shape, dtype=dtype), torch.zeros(shape, dtype=dtype)
    for (start, count), p in zip(chunks, payloads, strict=True):
        k[:, row, :, start : start + count] = p[0]
        v[:, row, :, start : start + count] = p[1]
    return k, v


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.equal(a.view(torch.uint8), b.view(torch.uint8))  # NaN bit patterns included


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(layout=layouts(), seed=st.integers(0, 2**31 - 1), headers=st.lists(st.integers(0, 600), min_size=5, max_size=5),
       map_files=st.booleans())
def test_read_chunks_places_every_plane_and_hashes_the_whole_file(tmp_path, layout, seed, headers, map_files):
    """Mapped (streaming stores from the page cache, any alignment: headers of any length) or
    read with preadv: the same bytes in the same places and the same digests."""
    shape, row, dtype, chunks = layout
    L, _, H, _, D = shape
    gen = torch.Generator().manual_seed(seed)
    payloads = [payload(L, H, D, count, dtype, gen) for _, count in chunks]
    files, blobs = [], []
    for i, ((start, count), p) in enumerate(zip(chunks, payloads, strict=True)):
        head = os.urandom(headers[i])
        ids = torch.randint(-(2**31), 2**31 - 1, (count,), dtype=torch.int32, generator=gen)
        blob = head + p.contiguous().view(torch.uint8).numpy().tobytes() + ids.numpy().astype("<i4").tobytes()
        path = tmp_path / f"{seed}-{i}"
        path.write_bytes(blob)
        files.append((path, head, ids, native.FileChunk(start, count, 0, len(head))))
        blobs.append(blob)
    k, v = torch.zeros(shape, dtype=dtype), torch.zeros(shape, dtype=dtype)
    fds = [os.open(path, os.O_RDONLY) for path, *_ in files]
    try:
        got = native.read_chunks([native.FileChunk(f.start, f.count, fd, f.header_bytes)
                                  for (*_, f), fd in zip(files, fds, strict=True)], k, v, row, map_files=map_files)
    finally:
        for fd in fds:
            os.close(fd)
    ek, ev = expected_cache(shape, row, dtype, chunks, payloads)
    assert same_bits(k, ek) and same_bits(v, ev)  # every other row and position untouched (zero)
    for (_, head, ids, _), blob, r in zip(files, blobs, got, strict=True):
        assert r.error == 0 and r.header == head and np.array_equal(r.ids, ids.numpy())
        assert r.digest == xxhash.xxh3_128_hexdigest(blob)


@settings(max_examples=40, deadline=None)
@given(layout=layouts(), seed=st.integers(0, 2**31 - 1), offset=st.integers(0, 63))
def test_copy_chunks_places_every_plane(layout, seed, offset):
    shape, row, dtype, chunks = layout
    L, _, H, _, D = shape
    gen = torch.Generator().manual_seed(seed)
    payloads = [payload(L, H, D, count, dtype, gen) for _, count in chunks]
    # payloads at any byte offset, as they sit behind a header in a memory store's object
    flat = [torch.cat([torch.zeros(offset, dtype=torch.uint8), p.contiguous().view(-1).view(torch.uint8)])[offset:]
            for p in payloads]
    k, v = torch.zeros(shape, dtype=dtype), torch.zeros(shape, dtype=dtype)
    native.copy_chunks([(f, native.Span(s, c)) for f, (s, c) in zip(flat, chunks, strict=True)], k, v, row)
    ek, ev = expected_cache(shape, row, dtype, chunks, payloads)
    assert same_bits(k, ek) and same_bits(v, ev)


@pytest.mark.parametrize("map_files", [True, False])
def test_short_and_unreadable_files_report_errors(tmp_path, map_files):
    k = v = torch.zeros(2, 1, 2, 16, 4)
    full = 8 + 2 * 2 * 2 * 16 * 4 * 4 + 16 * 4
    for size in (0, 7, 8, full // 2, full - 1):
        path = tmp_path / f"f{size}"
        path.write_bytes(b"\1" * size)
        fd = os.open(path, os.O_RDONLY)
        try:
            (r,) = native.read_chunks([native.FileChunk(0, 16, fd, 8)], k, v, map_files=map_files)
        finally:
            os.close(fd)
        assert r.error == -1, size
    (r,) = native.read_chunks([native.FileChunk(0, 16, 1 << 20, 8)], k, v, map_files=map_files)  # not an open file
    assert r.error == errno.EBADF


def test_a_file_that_cannot_be_mapped_is_read_with_preadv(tmp_path):
    """mmap refuses a descriptor opened write-only; the reader then takes the preadv path,
    whose error (EBADF: not open for reading) shows that it ran."""
    path = tmp_path / "chunk"
    path.write_bytes(b"\1" * (8 + 2 * 2 * 2 * 16 * 4 * 4 + 16 * 4))
    fd = os.open(path, os.O_WRONLY)
    try:
        (r,) = native.read_chunks([native.FileChunk(0, 16, fd, 8)], torch.zeros(2, 1, 2, 16, 4), torch.zeros(2, 1, 2, 16, 4))
    finally:
        os.close(fd)
    assert r.error == errno.EBADF


def chunk_files(tmp_path: Path, n: int, count: int = 64, seed: int = 0) -> tuple[list[Path], int]:
    """n chunk files for a (2, 1, 2, n * count, 64) float32 cache (a 16-byte header each), and
    the header's length."""
    gen = torch.Generator().manual_seed(seed)
    paths = []
    for i in range(n):
        path = tmp_path / f"chunk{i}"
        path.write_bytes(b"h" * 16 + payload(2, 2, 64, count, torch.float32, gen).numpy().tobytes()
                         + np.arange(count, dtype="<i4").tobytes())
        paths.append(path)
    return paths, 16


def read_all_chunks(paths: list[Path], header: int, k: torch.Tensor, v: torch.Tensor, count: int = 64,
                    **kw) -> list[native.ChunkRead]:
    fds = [os.open(p, os.O_RDONLY) for p in paths]
    try:
        return native.read_chunks([native.FileChunk(i * count, count, fd, header) for i, fd in enumerate(fds)],
                                  k, v, **kw)
    finally:
        for fd in fds:
            os.close(fd)


@contextlib.contextmanager
def cut_after_mapping(size: int):
    native.module().truncate_after_map_for_tests(size)
    try:
        yield
    finally:
        native.module().truncate_after_map_for_tests(-1)


def test_a_file_cut_short_while_mapped_is_reported_and_the_process_lives_on(tmp_path):
    """Each file cut to 100 bytes right after it is mapped, on torch's threads: reading past the
    end raises SIGBUS, which the guard turns into MAP_FAULT for that file, round after round
    (the signal mask is restored each time); afterwards files read normally."""
    k, v = torch.zeros(2, 1, 2, 4 * 64, 64), torch.zeros(2, 1, 2, 4 * 64, 64)
    for round_ in range(3):
        paths, header = chunk_files(tmp_path, 4, seed=round_)
        with cut_after_mapping(100):
            got = read_all_chunks(paths, header, k, v)
        assert [r.error for r in got] == [native.MAP_FAULT] * 4
        assert all(p.stat().st_size == 100 for p in paths)
    paths, header = chunk_files(tmp_path, 4)
    got = read_all_chunks(paths, header, k, v)
    assert [r.error for r in got] == [0] * 4
    assert [r.digest for r in got] == [xxhash.xxh3_128_hexdigest(p.read_bytes()) for p in paths]


def test_a_restore_whose_file_is_cut_short_midway_is_refused(tiny, tmp_path):
    live = tiny.new_session(capacity=600, seed=3)
    logits = live.prefill(prompt(520))
    store = DirectoryStore(tmp_path / "s", create=True)
    save_session(store, "s", live, logits=logits)
    for path in (store.path(c.obj.key) for c in store.manifest("s").sessions[0].chunks):
        os.chmod(path, 0o644)
    with cut_after_mapping(100), pytest.raises(SnapshotError, match="reading the file failed midway"):
        restore_session(store, "s", tiny)


@pytest.mark.parametrize("map_files", [True, False])
def test_what_is_hashed_is_what_is_placed_while_the_file_changes(tmp_path, map_files):
    """Another thread flips one byte of a chunk file in place, back and forth, while it is read
    again and again: whenever the digest is one version's, the cache holds that version (the
    mapped path hashes the copy it places, not a second read of the page cache)."""
    (path,), header = chunk_files(tmp_path, 1, count=32)
    versions = [path.read_bytes()]
    flipped = bytearray(versions[0])
    at = header + 5000  # inside the second page of the keys
    flipped[at] ^= 0xFF
    versions.append(bytes(flipped))
    digests = [xxhash.xxh3_128_hexdigest(b) for b in versions]
    planes = [torch.frombuffer(bytearray(b[header:-4 * 32]), dtype=torch.float32).view(2, 2, 2, 32, 64) for b in versions]
    stop = threading.Event()

    def flip():
        fd = os.open(path, os.O_WRONLY)
        try:
            while not stop.is_set():
                for b in versions:
                    os.pwrite(fd, b[at : at + 1], at)
        finally:
            os.close(fd)

    k, v = torch.zeros(2, 1, 2, 32, 64), torch.zeros(2, 1, 2, 32, 64)
    seen = {0: 0, 1: 0, None: 0}
    worker = threading.Thread(target=flip)
    worker.start()
    try:
        for _ in range(3000):
            (r,) = read_all_chunks([path], header, k, v, count=32, map_files=map_files)
            which = digests.index(r.digest) if r.digest in digests else None
            seen[which] += 1
            if which is not None:
                assert same_bits(k[:, 0], planes[which][0]) and same_bits(v[:, 0], planes[which][1]), which
    finally:
        stop.set()
        worker.join()
    assert seen[0] and seen[1], seen  # both versions were read while the other thread wrote


def test_a_chunk_truncated_during_restores_is_refused_never_fatal(tiny, tmp_path):
    """Another process cutting a chunk file short and restoring it, again and again, while
    restores run: each restore either equals the snapshot or raises SnapshotError (the short
    file, its digest, or the SIGBUS caught mid-read), and the process survives."""
    live = tiny.new_session(capacity=1100, seed=3)
    logits = live.prefill(prompt(1024))
    store = DirectoryStore(tmp_path / "s", create=True)
    save_session(store, "s", live, logits=logits)
    rec = store.manifest("s").sessions[0]
    victim = store.path(rec.chunks[1].obj.key)
    blob = victim.read_bytes()
    os.chmod(victim, 0o644)
    stop = threading.Event()

    def vandal():
        with open(victim, "r+b") as f:
            while not stop.is_set():
                f.truncate(len(blob) // 3)
                f.seek(0)
                f.write(blob)
                f.flush()

    outcomes = {"exact": 0, "refused": 0}
    worker = threading.Thread(target=vandal)
    worker.start()
    try:
        for _ in range(60):
            try:
                got = restore_session(store, "s", tiny)
            except SnapshotError:
                outcomes["refused"] += 1
                continue
            assert torch.equal(got.session.kv_state()["k"], live.kv_state()["k"])
            assert torch.equal(got.session.kv_state()["v"], live.kv_state()["v"])
            got.session.close()
            outcomes["exact"] += 1
    finally:
        stop.set()
        worker.join()
    assert outcomes["refused"] > 0, outcomes  # the race was really run


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(sizes=st.lists(st.integers(0, 700_000), min_size=1, max_size=6), seed=st.integers(0, 2**31 - 1),
       gaps=st.lists(st.integers(0, 64), min_size=6, max_size=6))
def test_read_files_fills_each_buffer_and_hashes_it(tmp_path, sizes, seed, gaps):
    """Whole files (sizes spanning several 256 KiB pieces, or none) into slices of one buffer,
    with untouched bytes between them: each slice holds its file, the digest is python-xxhash's,
    and nothing outside the slices is written."""
    rng = np.random.default_rng(seed)
    blobs = [rng.integers(0, 256, n, dtype=np.uint8).tobytes() for n in sizes]
    buf = torch.full((sum(sizes) + sum(gaps),), 0xA5, dtype=torch.uint8)
    slices, at, fds = [], 0, []
    try:
        for i, blob in enumerate(blobs):
            path = tmp_path / f"f{i}"
            path.write_bytes(blob)
            fds.append(os.open(path, os.O_RDONLY))
            at += gaps[i]
            slices.append((at, len(blob)))
            at += len(blob)
        got = native.read_files([(fd, buf[o : o + n]) for fd, (o, n) in zip(fds, slices, strict=True)])
    finally:
        for fd in fds:
            os.close(fd)
    outside = torch.ones_like(buf, dtype=torch.bool)
    for blob, (o, n), (digest, error) in zip(blobs, slices, got, strict=True):
        assert error == 0 and digest == xxhash.xxh3_128_hexdigest(blob)
        assert bytes(buf[o : o + n].numpy()) == blob
        outside[o : o + n] = False
    assert bool((buf[outside] == 0xA5).all())


def test_read_files_reports_short_files_and_refuses_bad_buffers(tmp_path):
    path = tmp_path / "f"
    path.write_bytes(b"\1" * 1000)
    fd = os.open(path, os.O_RDONLY)
    try:
        for size in (1001, 300_000):
            assert native.read_files([(fd, torch.empty(size, dtype=torch.uint8))])[0][1] == -1
        assert native.read_files([(1 << 20, torch.empty(10, dtype=torch.uint8))])[0][1] == errno.EBADF
        for bad in (torch.empty(10, dtype=torch.int16), torch.empty(20, dtype=torch.uint8)[::2]):
            with pytest.raises(ValueError, match="contiguous uint8"):
                native.read_files([(fd, bad)])
    finally:
        os.close(fd)


@pytest.mark.parametrize(("change", "message"), [
    (lambda k, v, s: (k, v, [native.Span(10, 7)], 0), "outside a cache of 16"),
    (lambda k, v, s: (k, v, [native.Span(-1, 2)], 0), "outside"),
    (lambda k, v, s: (k, v, s, 1), "row 1 of a batch of 1"),
    (lambda k, v, s: (k, v.double(), s, 0), "one .* shape"),
    (lambda k, v, s: (k.transpose(3, 4), v.transpose(3, 4), s, 0), "contiguous"),
    (lambda k, v, s: (k[0], v[0], s, 0), "one .* shape"),
    (lambda k, v, s: (k, v[:, :, :1], s, 0), "one .* shape"),
])
def test_bad_arguments_are_refused_before_the_call(change, message):
    k, v = torch.zeros(2, 1, 2, 16, 4), torch.zeros(2, 1, 2, 16, 4)
    k, v, spans, row = change(k, v, [native.Span(0, 16)])
    with pytest.raises(ValueError, match=message):
        native.copy_chunks([(torch.zeros(1 << 16, dtype=torch.uint8), s) for s in spans], k, v, row)
    with pytest.raises(ValueError, match=message):
        native.read_chunks([native.FileChunk(s.start, s.count, 0, 0) for s in spans], k, v, row)


def test_payloads_too_small_or_of_another_kind_are_refused():
    k = v = torch.zeros(2, 1, 2, 16, 4)
    need = 2 * 2 * 2 * 16 * 4 * 4
    for bad in (torch.zeros(need - 1, dtype=torch.uint8), torch.zeros(need, dtype=torch.int16),
                torch.zeros(2 * need, dtype=torch.uint8)[::2]):
        with pytest.raises(ValueError, match="payload"):
            native.copy_chunks([(bad, native.Span(0, 16))], k, v)


@pytest.mark.parametrize("source", ["directory", "memory"])
def test_restores_through_the_native_reader_equal_the_python_path(tiny, tmp_path, source):
    live = tiny.new_session(capacity=2048, seed=3)
    logits = live.prefill(prompt(1100))  # four full chunks and a partial one
    store = DirectoryStore(tmp_path / "s", create=True)
    save_session(store, "s", live, logits=logits)
    if source == "memory":
        memory = MemoryStore()
        memory.load(store, "s")
        store = memory
    calls = {"read_chunks": 0, "copy_chunks": 0}

    def counted(name):
        real = getattr(native, name)

        def call(*args, **kwargs):
            calls[name] += 1
            return real(*args, **kwargs)
        return call

    with mock.patch.object(native, "read_chunks", counted("read_chunks")), \
            mock.patch.object(native, "copy_chunks", counted("copy_chunks")):
        fast = restore_session(store, "s", tiny)
    assert calls == {"read_chunks": int(source == "directory"), "copy_chunks": int(source == "memory")}
    with reader("python"):
        slow = restore_session(store, "s", tiny)
    for name in ("k", "v"):
        assert torch.equal(fast.session.kv_state()[name], live.kv_state()[name])
        assert torch.equal(slow.session.kv_state()[name], live.kv_state()[name])
    assert fast.session.tokens == slow.session.tokens == live.tokens
    assert torch.equal(fast.logits, logits) and torch.equal(slow.logits, logits)


def test_the_build_is_cached_per_source(tmp_path):
    module = native.module()
    assert Path(module.__file__).parent.parent.name == "native"
    assert Path(module.__file__).name.startswith("driftwood_snapshot_")
