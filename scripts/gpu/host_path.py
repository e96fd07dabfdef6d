"""Where a synchronized batch-1 decode token's time goes on the host (issue 6): the pieces of
``Session.decode`` timed one by one around a captured step, beside the step's GPU time.

Usage: python3 scripts/gpu/host_path.py MODEL.gguf [OUT.json]

Each figure is the median over ``N`` repetitions (µs): ``decode_sync`` is what
``driftwood bench decode`` reports (call, then ``torch.cuda.synchronize``); ``replay_sync``
the same without the input copy and the logits' clone; ``gpu`` the replayed graph alone in
CUDA events; the rest are host times of each call with the GPU idle before it.
"""

from __future__ import annotations

import json
import statistics
import sys
import time

import torch

from driftwood.model import load_model

N = 300


def median_us(fn, sync_before: bool = True, sync_after: bool = True) -> float:
    times = []
    for _ in range(N):
        if sync_before:
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if sync_after:
            torch.cuda.synchronize()
        times.append((time.perf_counter() - t) * 1e6)
    return round(statistics.median(times), 2)


def main() -> int:
    path = sys.argv[1]
    model = load_model(path, device="cuda", dtype="bfloat16", progress=False)
    ids = [(i * 7919) % 100000 + 5 for i in range(64)]
    out: dict[str, float] = {}
    with torch.inference_mode():
        s = model.new_session(capacity=4160)
        s.prefill(ids[:24])
        for i in range(4):
            s.decode(ids[24 + i])
        dec = s._decoder
        graph, logits = dec.graphs[1]
        pos = s.position

        def rewind():  # every timed decode writes the same position
            del s.tokens[pos:]

        def decode():
            rewind()
            s.decode(ids[30])

        out["decode_sync"] = median_us(decode)
        out["replay_sync"] = median_us(graph.replay)
        out["decoder_sync"] = median_us(lambda: dec([ids[30]], [pos]))  # the inputs written, no clone
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        gpu = []
        for _ in range(N):
            torch.cuda.synchronize()
            start.record()
            graph.replay()
            end.record()
            end.synchronize()
            gpu.append(start.elapsed_time(end) * 1e3)
        out["gpu"] = round(statistics.median(gpu), 2)
        out["decode_call"] = median_us(decode, sync_after=False)
        out["replay_call"] = median_us(graph.replay, sync_after=False)
        host = torch.tensor([[ids[30]], [pos]], dtype=torch.int64)
        out["tensor_call"] = median_us(lambda: torch.tensor([[ids[30]], [pos]], dtype=torch.int64), sync_after=False)
        out["copy_call"] = median_us(lambda: dec.io[:, :1].copy_(host, non_blocking=True), sync_after=False)
        out["copy_sync"] = median_us(lambda: dec.io[:, :1].copy_(host, non_blocking=True))
        out["clone_call"] = median_us(lambda: logits[0].clone(), sync_after=False)
        out["sync_idle"] = median_us(lambda: None)
        out["python_checks"] = median_us(lambda: (rewind(), s._cache(), s._validate([ids[30]])), sync_before=False,
                                         sync_after=False)
        # the one-row inputs: two stream memory writes (what decode does) against the copy,
        # alternating so that both see the same machine
        w = dec.write_value
        stream_raw = torch._C._cuda_getCurrentRawStream
        index = dec.device.index or 0
        out["current_stream_call"] = median_us(lambda: torch.cuda.current_stream(dec.device).cuda_stream,
                                               sync_after=False)
        out["raw_stream_call"] = median_us(lambda: stream_raw(index), sync_after=False)
        if w is not None:
            at, st = dec.io.data_ptr(), stream_raw(index)
            out["write_values_call"] = median_us(lambda: (w(st, at, ids[30]), w(st, at + 8 * dec.cache.batch, pos)),
                                                 sync_after=False)
        pair: dict[bool, list[float]] = {True: [], False: []}
        for i in range(2 * N):
            mode = bool(i % 2) and w is not None
            dec.write_value = w if mode else None
            torch.cuda.synchronize()
            t = time.perf_counter()
            decode()
            torch.cuda.synchronize()
            pair[mode].append((time.perf_counter() - t) * 1e6)
        dec.write_value = w
        out["decode_sync_write_values"] = round(statistics.median(pair[True]), 2) if w is not None else None
        out["decode_sync_copied"] = round(statistics.median(pair[False]), 2)
        out["out_clone_call"] = median_us(lambda: logits.clone(), sync_after=False)
        out["empty_copy_call"] = median_us(lambda: torch.empty_like(logits[0]).copy_(logits[0]), sync_after=False)
    row = {"command": " ".join(["python3", *sys.argv]), "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
           "model": path, "device": torch.cuda.get_device_name(), "us": out, "repetitions": N}
    print(json.dumps(row, indent=1))
    if len(sys.argv) > 2:
        with open(sys.argv[2], "w") as f:
            json.dump(row, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
