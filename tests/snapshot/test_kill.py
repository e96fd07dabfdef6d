"""A writer SIGKILLed at random moments mid-snapshot, many times: the snapshot it committed
last stays intact, and nothing half-written is ever visible."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

from driftwood.snapshot.format import KEY_RE
from driftwood.snapshot.session import restore_session
from driftwood.snapshot.store import DirectoryStore
from driftwood.snapshot.verify import verify

ROUNDS = 30
ROOT = Path(__file__).resolve().parent.parent.parent


def complete_safetensors(path: Path) -> bool:
    raw = path.read_bytes()
    if len(raw) < 8:
        return False
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + n])
    end = max(v["data_offsets"][1] for k, v in header.items() if k != "__metadata__")
    return len(raw) == 8 + n + end


def test_sigkill_mid_snapshot_leaves_the_last_one_intact(tiny, tiny_path, tmp_path):
    root = tmp_path / "store"
    writer = subprocess.Popen([sys.executable, str(Path(__file__).parent / "kill_writer.py"), str(root), str(tiny_path)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT,
                              env={**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "src"), str(ROOT), os.environ.get("PYTHONPATH")]))})
    assert writer.stdin and writer.stdout
    try:
        assert writer.stdout.readline().strip() == "ready"
        store = DirectoryStore(root)
        rng = random.Random(0)
        killed_after = []
        for _ in range(ROUNDS):
            writer.stdin.write("go\n")
            writer.stdin.flush()
            line = writer.stdout.readline().split()
            assert line[0] == "pid", line
            pid = int(line[1])
            assert writer.stdout.readline().startswith("saved")  # a committed snapshot exists
            time.sleep(rng.uniform(0, 0.15))  # then kill it somewhere in a later save
            os.kill(pid, signal.SIGKILL)
            saves = 1
            while (text := writer.stdout.readline()).startswith("saved"):
                saves += 1
            assert text.strip() == "reaped", text
            killed_after.append(saves)

            # the visible snapshot is whole: every byte checks out
            assert store.names() == ["live"]
            report = verify(store, "live")
            assert report.objects == len(report.manifest.objects())
            # nothing half-written under a real name: every stored chunk is a whole file
            for p in (root / "chunks").iterdir():
                assert KEY_RE.fullmatch(f"chunks/{p.name}") and complete_safetensors(p), p
        # kills landed at different points, not always before the first write
        assert len(set(killed_after)) > 3
        restore_session(store, "live", tiny).session.close()
        left = list((root / "tmp").iterdir())
        gc = store.gc()
        assert list((root / "tmp").iterdir()) == []
        assert gc.kept == len({o.key for o in store.manifest("live").objects()})
        verify(store, "live")
        print(f"kills after {killed_after} saves; {len(left)} temporary files and {gc.removed} orphans collected")
    finally:
        writer.stdin.close()
        writer.wait(timeout=30)
