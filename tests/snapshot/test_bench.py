"""``driftwood bench snapshot`` end to end on a tiny random model: every restore exact, the
JSON's columns present and consistent, and the docs renderer takes the file."""

from __future__ import annotations

import json

from scripts.render_docs import render_snapshot

from driftwood.cli.main import main


def test_bench_snapshot_writes_a_consistent_result(tiny_path, tmp_path, capsys):
    out = tmp_path / "snapshot.json"
    rc = main(["bench", "snapshot", "--device", "cpu", "--model", str(tiny_path), "--dtype", "float32",
               "--contexts", "24,300", "--repeat", "2", "--json", str(out)])
    assert rc == 0
    data = json.loads(out.read_text())
    rows = data["rows"]
    assert [r["tokens"] for r in rows] == [24, 300]
    for r in rows:
        assert r["exact"] is True
        assert r["restore_dir_ms"] > 0 and r["restore_session_ms"] > 0
        assert r["kv_bytes"] == r["tokens"] * data["model"]["kv_bytes_per_token"]
        assert r["bytes"] > r["kv_bytes"]  # plus headers, token ids, logits and the manifest
        assert abs(r["speedup"] - r["recompute_ms"] / r["restore_dir_ms"]) < 1e-6 * r["speedup"]
    # 300 tokens are two chunks: saving 24 more rewrites only the partial one (and the logits)
    inc = data["incremental"][-1]
    assert inc["objects_written"] == 2 and inc["chunks_reused"] == 1
    assert "restore_session ms" in capsys.readouterr().out
    rendered = render_snapshot([{**data, "_file": "benchmarks/results/snapshot.json"}])
    assert "restore_session ms" in rendered and "| 300 |" in rendered
