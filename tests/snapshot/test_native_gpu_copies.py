"""read_files_to_gpu (driftwood/snapshot/native): each reading thread queues its file's payload
for the GPU as the bytes arrive. Here a stand-in for the CUDA driver's two entry points (ctypes
callbacks copying into host memory, each call recorded) checks what the reader asks of the
driver: every payload byte copied once, in order, a step at a time, none before it was read;
driver errors reported per file. On the device the real driver is used (the CUDA round trips of
tests/snapshot/test_session.py restore from a directory store through it)."""

from __future__ import annotations

import ctypes
import os
import threading

import numpy as np
import pytest
import torch
import xxhash
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from driftwood.errors import SnapshotError
from driftwood.snapshot import native
from driftwood.snapshot.session import _ChunkLoader
from tests.conftest import requires_cuda

pytestmark = pytest.mark.skipif(native.module() is None, reason="the native snapshot reader could not be built here")

PIECE = 256 << 10  # chunks.cpp's kGroupBytes: a file is read this much at a time
SET_CONTEXT = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p)
COPY = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_uint64, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p)
CONTEXT, STREAM = 0x1234, 0x5678


class HostDriver:
    """cuCtxSetCurrent and cuMemcpyHtoDAsync_v2 stood in for by callbacks: the "device" is
    host memory, every call is recorded, and the copy fails with ``error`` once ``fail_at``
    copies were made."""

    def __init__(self, error: int = 0, fail_at: int = 0) -> None:
        self.error, self.fail_at = error, fail_at
        self.contexts: list[int | None] = []
        self.copies: list[tuple[int, int, int, int | None]] = []  # (dst, src, n, stream)
        self.lock = threading.Lock()
        self._set, self._copy = SET_CONTEXT(self._set_context), COPY(self._copy_bytes)

    def _set_context(self, ctx: int | None) -> int:
        with self.lock:
            self.contexts.append(ctx)
        return 0

    def _copy_bytes(self, dst: int, src: int | None, n: int, stream: int | None) -> int:
        with self.lock:
            if self.error and len(self.copies) >= self.fail_at:
                return self.error
            self.copies.append((dst, src or 0, n, stream))
        ctypes.memmove(dst, src, n)
        return 0

    def driver(self) -> native.Driver:
        def address(fn) -> int:
            return ctypes.cast(fn, ctypes.c_void_p).value

        return native.Driver(address(self._set), address(self._copy), CONTEXT, STREAM)


def open_files(tmp_path, blobs: list[bytes]) -> tuple[list[int], torch.Tensor, list[tuple[int, torch.Tensor]]]:
    staging = torch.zeros(sum(len(b) for b in blobs), dtype=torch.uint8)
    fds, files, at = [], [], 0
    for i, blob in enumerate(blobs):
        (tmp_path / f"f{i}").write_bytes(blob)
        fds.append(os.open(tmp_path / f"f{i}", os.O_RDONLY))
        files.append((fds[-1], staging[at : at + len(blob)]))
        at += len(blob)
    return fds, staging, files


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(sizes=st.lists(st.integers(0, 3 * PIECE + 999), min_size=1, max_size=5), seed=st.integers(0, 2**31 - 1),
       cuts=st.lists(st.tuples(st.floats(0, 1), st.floats(0, 1)), min_size=5, max_size=5),
       step=st.sampled_from([1, 4096, PIECE, PIECE + 1, 1 << 40]))
def test_each_payload_is_copied_once_in_order_a_step_at_a_time(tmp_path, sizes, seed, cuts, step):
    """Files of random bytes, each with a payload somewhere inside it: every payload ends up in
    its destination and nothing else is written there; a file's copies tile its payload in
    order, each one at least ``step`` bytes but the last, each ending at a piece the reader had
    read (a multiple of 256 KiB from the file's start, the payload's end, or the file's end);
    the copies name the stream, the readers the context; the digests are python-xxhash's."""
    rng = np.random.default_rng(seed)
    blobs = [rng.integers(0, 256, n, dtype=np.uint8).tobytes() for n in sizes]
    fds, staging, files = open_files(tmp_path, blobs)
    payloads = []
    for blob, (a, b) in zip(blobs, cuts, strict=False):
        begin, end = sorted((int(a * len(blob)), int(b * len(blob))))
        payloads.append(native.Payload(torch.full((end - begin,), 0xA5, dtype=torch.uint8), begin, end))
    host = HostDriver()
    try:
        got = native.read_files_to_gpu(files, payloads, host.driver(), step)
    finally:
        for fd in fds:
            os.close(fd)
    assert host.contexts == [CONTEXT] * len(blobs)
    base = staging.data_ptr()
    for (_, buf), blob, p, (digest, error) in zip(files, blobs, payloads, got, strict=True):
        assert error == 0 and digest == xxhash.xxh3_128_hexdigest(blob)
        assert bytes(p.dst.numpy()) == blob[p.begin : p.end]
        mine = [c for c in host.copies if p.dst.numel() and p.dst.data_ptr() <= c[0] < p.dst.data_ptr() + p.dst.numel()]
        at = p.begin
        for i, (dst, src, n, stream) in enumerate(mine):
            assert stream == STREAM and n > 0
            assert dst - p.dst.data_ptr() == at - p.begin and src - buf.data_ptr() == at  # in order, no gap
            at += n
            assert i == len(mine) - 1 or n >= step
            assert at == p.end or at % PIECE == 0 or at == len(blob)  # where a piece of the file ended
        assert at == p.end
    assert sum(c[2] for c in host.copies) == sum(p.end - p.begin for p in payloads)
    assert all(base <= c[1] < base + staging.numel() for c in host.copies)


def test_a_short_file_copies_only_what_was_read(tmp_path):
    blob = bytes(range(256)) * ((PIECE + 1000) // 256)
    (tmp_path / "f").write_bytes(blob)
    buf = torch.zeros(2 * PIECE, dtype=torch.uint8)
    dst = torch.zeros(2 * PIECE - 100, dtype=torch.uint8)
    host = HostDriver()
    fd = os.open(tmp_path / "f", os.O_RDONLY)
    try:
        ((_, error),) = native.read_files_to_gpu([(fd, buf)], [native.Payload(dst, 100, 2 * PIECE)], host.driver(), 1)
    finally:
        os.close(fd)
    assert error == -1
    assert [c[2] for c in host.copies] == [PIECE - 100]  # the first piece; the second never came
    assert bytes(dst[: PIECE - 100].numpy()) == blob[100:PIECE] and not dst[PIECE - 100 :].any()


def test_a_driver_error_is_reported_for_the_file_and_refused_by_the_restore(tmp_path):
    fds, _, files = open_files(tmp_path, [b"\1" * (3 * PIECE), b"\2" * PIECE])
    host = HostDriver(error=700, fail_at=1)  # the second copy fails
    payloads = [native.Payload(torch.zeros(3 * PIECE, dtype=torch.uint8), 0, 3 * PIECE),
                native.Payload(torch.zeros(0, dtype=torch.uint8), 0, 0)]
    try:
        got = native.read_files_to_gpu(files, payloads, host.driver(), PIECE)
    finally:
        for fd in fds:
            os.close(fd)
    assert [e for _, e in got] == [native.CUDA_ERROR - 700, 0]
    assert len(host.copies) == 1
    with pytest.raises(SnapshotError, match="CUDA driver error 700"):
        _ChunkLoader._check_read("chunk at token 0", got[0][1])


def test_bad_payloads_and_steps_are_refused_before_the_call(tmp_path):
    (tmp_path / "f").write_bytes(b"\1" * 100)
    fd = os.open(tmp_path / "f", os.O_RDONLY)
    buf, driver = torch.zeros(100, dtype=torch.uint8), HostDriver().driver()
    cases = [
        ([native.Payload(torch.zeros(20, dtype=torch.uint8), 90, 110)], 1, "outside its 100-byte file"),
        ([native.Payload(torch.zeros(5, dtype=torch.uint8), 10, 5)], 1, "outside"),
        ([native.Payload(torch.zeros(9, dtype=torch.uint8), 0, 10)], 1, "of its length"),
        ([native.Payload(torch.zeros(10, dtype=torch.int16), 0, 10)], 1, "uint8"),
        ([native.Payload(torch.zeros(10, dtype=torch.uint8), 0, 10)], 0, "at least one byte"),
        ([], 1, "one payload a file"),
    ]
    try:
        for payloads, step, message in cases:
            with pytest.raises(ValueError, match=message):
                native.read_files_to_gpu([(fd, buf)], payloads, driver, step)
    finally:
        os.close(fd)


@requires_cuda
def test_the_real_driver_puts_every_payload_on_the_device(tmp_path):
    rng = np.random.default_rng(5)
    blobs = [rng.integers(0, 256, n, dtype=np.uint8).tobytes() for n in (3 * PIECE + 7, 1000, 0, PIECE)]
    fds, staging, _ = open_files(tmp_path, blobs)
    pinned = staging.pin_memory()
    files, at = [], 0
    for fd, blob in zip(fds, blobs, strict=True):
        files.append((fd, pinned[at : at + len(blob)]))
        at += len(blob)
    payloads = [native.Payload(torch.zeros(max(len(b) - 10, 0), dtype=torch.uint8, device="cuda"), min(10, len(b)),
                               len(b)) for b in blobs]
    try:
        got = native.read_files_to_gpu(files, payloads, native.cuda_driver(torch.device("cuda")), PIECE)
        torch.cuda.current_stream().synchronize()
    finally:
        for fd in fds:
            os.close(fd)
    for blob, p, (digest, error) in zip(blobs, payloads, got, strict=True):
        assert error == 0 and digest == xxhash.xxh3_128_hexdigest(blob)
        assert bytes(p.dst.cpu().numpy()) == blob[p.begin : p.end]
    pageable = [(-1, staging[: len(blobs[0])])]  # refused before any file is touched
    with pytest.raises(ValueError, match="pinned"):
        native.read_files_to_gpu(pageable, payloads[:1], native.cuda_driver(torch.device("cuda")), 1)


@requires_cuda
def test_without_the_driver_a_cuda_restore_from_files_copies_after_reading(tiny_path, tmp_path, monkeypatch):
    """Where there is no CUDA driver to hand the readers (a ROCm build), the files are read
    first and copied with torch: the same exact restore."""
    from driftwood.model import load_model
    from driftwood.snapshot.session import restore_session, save_session
    from driftwood.snapshot.store import DirectoryStore
    from tests.snapshot.conftest import prompt

    model = load_model(str(tiny_path), device="cuda", progress=False)
    store = DirectoryStore(tmp_path / "s", create=True)
    live = model.new_session(capacity=1024, seed=3)
    save_session(store, "s", live, logits=live.prefill(prompt(600)))
    calls = []
    monkeypatch.setattr(native, "cuda_driver", lambda device: calls.append(device))
    restored = restore_session(store, "s", model)
    assert calls and restored.session.tokens == live.tokens
    for name in ("k", "v"):
        assert torch.equal(restored.session.kv_state()[name], live.kv_state()[name])
