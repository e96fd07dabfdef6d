"""Guest-driven vs Python-driven decode: what the sandbox boundary costs per token.

The same process, model and session settings run two ways, interleaved round by round:

- **guest**: the ``bench_decode`` guest calls ``dw_generate`` once per token through the
  native ABI (wasm → host call → bounds checks → engine → back);
- **python**: the engine driven directly, ``Session.sample`` then ``Session.decode``.

Greedy decoding on both sides must produce the same tokens. The ratio of median decode
times (guest ÷ python) is the boundary's cost; 1.00 means free.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from typing import Any

from driftwood.errors import DriftwoodError

PROMPT_TEXT = (
    "The history of the printing press begins in the fifteenth century, when movable type "
    "changed how knowledge travelled across Europe and beyond, reaching every corner of the world."
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    p.add_argument("--model", default="smollm2", help="model name or GGUF path (default: smollm2)")
    p.add_argument("--dtype", default=None, help="compute dtype (default: the engine's choice)")
    p.add_argument("--prompt-tokens", type=int, default=24)
    p.add_argument("--tokens", type=int, default=64, help="tokens generated per run (default 64)")
    p.add_argument("--rounds", type=int, default=7, help="interleaved rounds (default 7)")
    p.add_argument("--json", dest="json_path", help="where to write the JSON result")


def prompt_ids(model: Any, n: int) -> list[int]:
    ids = model.tokenizer.encode(PROMPT_TEXT, add_bos=False)
    while len(ids) < n:
        ids += ids
    return ids[:n]


def measure(device: str, spec: str, dtype: str | None, n_prompt: int, n_gen: int, rounds: int) -> dict[str, Any]:
    import numpy as np
    import torch

    from driftwood.model import SamplingParams
    from driftwood.runtime.abi.native import NativeABI
    from driftwood.runtime.actor import Actor, WasiOptions
    from driftwood.runtime.models import ModelPool
    from driftwood.runtime.module import GuestModule
    from driftwood.toolchain import build_example

    pool = ModelPool(device, dtype)
    pool.add("default", spec)
    model = pool.get("default")
    ids = prompt_ids(model, n_prompt)
    capacity = n_prompt + n_gen + 8

    module = GuestModule.load(build_example("bench_decode"))
    actor = Actor(module, device=device, wasi=WasiOptions(stdout=None, stderr=None),
                  host_modules=[lambda a: NativeABI(a, pool)])
    if (rc := actor.call("bench_open", capacity, 0)) < 0:
        raise DriftwoodError(f"bench guest could not open a session ({rc})")
    prompt_ptr = actor.call("bench_prompt")
    actor.arena.numpy(prompt_ptr, n_prompt, np.int32)[:] = ids
    generated_ptr = actor.call("bench_generated")
    session = model.new_session(capacity=capacity, seed=0)
    greedy = SamplingParams()

    def sync() -> None:
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    def guest_run() -> tuple[float, float, list[int]]:
        t0 = time.perf_counter()
        if actor.call("bench_prefill", n_prompt) != n_prompt:
            raise DriftwoodError("bench guest prefill failed")
        sync()
        t1 = time.perf_counter()
        if (rc := actor.call("bench_generate", n_gen)) != n_gen:
            raise DriftwoodError(f"bench guest generate failed ({rc})")
        sync()
        t2 = time.perf_counter()
        return t1 - t0, t2 - t1, actor.arena.numpy(generated_ptr, n_gen, np.int32).tolist()

    def python_run() -> tuple[float, float, list[int]]:
        t0 = time.perf_counter()
        session.reset()
        logits = session.prefill(ids)
        sync()
        t1 = time.perf_counter()
        out = []
        for _ in range(n_gen):
            token = session.sample(logits, greedy)
            logits = session.decode(token)
            out.append(token)
        sync()
        t2 = time.perf_counter()
        return t1 - t0, t2 - t1, out

    guest_run()  # warm-up (and compile, where the engine compiles)
    python_run()
    samples: dict[str, list[float]] = {"guest": [], "python": []}
    prefill: dict[str, list[float]] = {"guest": [], "python": []}
    tokens: dict[str, list[int]] = {}
    for r in range(rounds):
        order = [("guest", guest_run), ("python", python_run)]
        for name, fn in order if r % 2 == 0 else order[::-1]:
            pre, dec, toks = fn()
            prefill[name].append(pre)
            samples[name].append(dec)
            tokens[name] = toks
    actor.close()
    session.close()
    med = {k: statistics.median(v) for k, v in samples.items()}
    return {
        "prompt_tokens": n_prompt,
        "generated_tokens": n_gen,
        "rounds": rounds,
        "guest_ms_per_token": med["guest"] / n_gen * 1e3,
        "python_ms_per_token": med["python"] / n_gen * 1e3,
        "ratio": med["guest"] / med["python"],
        "guest_decode_s": samples["guest"],
        "python_decode_s": samples["python"],
        "guest_prefill_ms": statistics.median(prefill["guest"]) * 1e3,
        "python_prefill_ms": statistics.median(prefill["python"]) * 1e3,
        "same_tokens": tokens["guest"] == tokens["python"],
        "model": spec,
        "dtype": str(model.dtype),
    }


def run(args: argparse.Namespace) -> int:
    from driftwood.bench.report import default_path, environment, format_table, progress, write_json

    env = environment(args.device)
    progress(f"boundary: {env['device_name']}: {args.rounds} interleaved rounds of {args.tokens} tokens ...")
    result = measure(args.device, args.model, args.dtype, args.prompt_tokens, args.tokens, args.rounds)
    rows = [
        {"driver": "guest (wasm → dw_generate)", "ms_per_token": result["guest_ms_per_token"],
         "prefill_ms": result["guest_prefill_ms"]},
        {"driver": "python (Session.sample/decode)", "ms_per_token": result["python_ms_per_token"],
         "prefill_ms": result["python_prefill_ms"]},
    ]
    print(f"boundary benchmark — {env['device_name']}, {args.model} ({result['dtype']}), "
          f"{args.prompt_tokens}-token prompt, {args.tokens} tokens × {args.rounds} rounds")
    print(format_table(rows, [("driver", "driver"), ("ms_per_token", "decode ms/token"),
                              ("prefill_ms", f"prefill {args.prompt_tokens} ms")]))
    print(f"ratio guest/python: {result['ratio']:.4f}; identical tokens: {str(result['same_tokens']).lower()}")
    path = write_json({"benchmark": "boundary", "environment": env, **result},
                      args.json_path or default_path("boundary", args.device, env))
    print(f"wrote {path}")
    return 0 if result["same_tokens"] else 1


def main() -> int:
    p = argparse.ArgumentParser(prog="python -m driftwood.bench.boundary")
    add_arguments(p)
    return run(p.parse_args())


if __name__ == "__main__":
    sys.exit(main())
