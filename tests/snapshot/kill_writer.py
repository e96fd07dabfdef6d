"""A snapshot writer for test_kill.py: ``python kill_writer.py STORE MODEL``.

Loads the model once, then for every line on stdin forks a child that saves snapshots of a
session in a loop (its keys and values scribbled anew before each save, so that every save
writes new chunks) until the test SIGKILLs it. Prints ``pid N`` for each child, ``saved I``
after each save it committed, and ``reaped`` when the child is gone.
"""

from __future__ import annotations

import os
import sys

import torch

torch.set_num_threads(1)  # no thread pool: the children are forked

from driftwood.model import load_model  # noqa: E402
from driftwood.snapshot import DirectoryStore, forget, save_session  # noqa: E402


def main() -> int:
    store = DirectoryStore(sys.argv[1], create=True)
    model = load_model(sys.argv[2], device="cpu", dtype="float32", progress=False)
    session = model.new_session(capacity=2048, seed=0)
    logits = session.prefill([i % model.config.vocab_size for i in range(1100)])
    print("ready", flush=True)
    for _ in sys.stdin:
        pid = os.fork()
        if pid == 0:
            gen = torch.Generator().manual_seed(os.getpid())
            for i in range(1, 1 << 30):
                for layer in session.cache.k:  # new bytes for every chunk
                    layer.normal_(generator=gen)
                forget(session)  # ... which the saver must not assume unchanged
                save_session(store, "live", session, logits=logits)
                os.write(1, f"saved {i}\n".encode())
        print(f"pid {pid}", flush=True)
        os.waitpid(pid, 0)
        print("reaped", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
