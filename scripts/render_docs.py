#!/usr/bin/env python3
"""Render benchmark tables into the docs from committed JSON results.

Docs mark generated regions with ``<!-- bench:NAME -->`` ... ``<!-- /bench:NAME -->``; each
region is replaced by the table that ``RENDERERS[NAME]`` makes from the newest result per
device in ``benchmarks/results/`` (``NAME-cpu`` or ``NAME-cuda``: that device's only). Run after committing new results:

    python scripts/render_docs.py          # rewrite docs in place
    python scripts/render_docs.py --check  # exit 1 if a doc is out of date (tests use this)
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
DOCS = ROOT / "docs"
REGION = re.compile(r"(<!-- bench:(?P<name>[\w-]+) -->\n)(?P<body>.*?)(<!-- /bench:(?P=name) -->)", re.S)


def latest(bench: str) -> list[dict[str, Any]]:
    """The newest result of ``bench`` for each device kind (cpu, cuda), oldest device first."""
    newest: dict[str, dict[str, Any]] = {}
    for path in sorted(RESULTS.glob(f"{bench}-*.json")):
        data = json.loads(path.read_text())
        env = data["environment"]
        kind = env["device"].split(":")[0]
        data["_file"] = path.relative_to(ROOT).as_posix()
        if kind not in newest or env["date"] >= newest[kind]["environment"]["date"]:
            newest[kind] = data
    return [newest[k] for k in sorted(newest)]


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def source_line(data: dict[str, Any]) -> str:
    env = data["environment"]
    device = env.get("device_name") or env.get("gpu") or env["device"]
    return (f"*{device}, {env['date'][:10]}: `{env['command']}` "
            f"(torch {env['torch']}; [{Path(data['_file']).name}](../{data['_file']}))*")


def num(value: float | None, digits: int = 2) -> str:
    if value is None:
        return "–"
    return f"{value:,.{digits}f}"


def render_zerocopy(results: list[dict[str, Any]]) -> str:
    out = []
    for data in results:
        rows = []
        for p in data["paths"]:
            rows.append([
                p["path"], num(p["rss_delta_mib"], 3), num(p["device_delta_mib"], 2),
                num(p.get("torch_alloc_delta_mib"), 2), num(p.get("device_delta_after_read_mib"), 2),
                "yes" if p["same_address"] else "no", num(p["gemm_us"], 1),
            ])
        ident = data["pointer_identity"]
        guest = data["gemm_guest"]
        out.append(table(["path", "RSS Δ MiB", "device Δ MiB (driver)", "torch alloc Δ MiB",
                          "device Δ MiB after a read", "same address", f"GEMM {data['gemm_size']}² µs"], rows))
        out.append(f"\nPointer identity: **{str(ident['identical']).lower()}** (guest base "
                   f"`{ident['guest_base']}`, accelerator `{ident['accelerator_address']}`); GEMM guest: "
                   f"**{guest['errors']} errors of {guest['elements']:,}**.\n")
        out.append(source_line(data) + "\n")
    return "\n".join(out)


def render_snapshot(results: list[dict[str, Any]]) -> str:
    out = []
    for data in results:
        m = data["model"]
        reads = all("file_read_ms" in r for r in data["rows"])  # files of 2026-11-22 and later
        checked = all("verified_read_ms" in r for r in data["rows"])  # later still
        whole = all("restore_session_ms" in r for r in data["rows"])  # 2026-11-23 and later
        rows = []
        for r in data["rows"]:
            rows.append([
                f"{r['tokens']:,}", num(r["save_ms"], 1), num(r["restore_dir_ms"], 2), num(r["restore_mem_ms"], 2),
                *([num(r["restore_session_ms"], 2)] if whole else []), num(r["engine_copy_ms"], 2), f"{r['bytes'] / 1e6:,.1f}", num(r["recompute_ms"], 0),
                f"{r['speedup_dir']:,.0f}×", f"{r['speedup_mem']:,.0f}×", num(r["bandwidth_ms"], 2),
                f"{r['dir_vs_bandwidth']:.2f}", f"{r['mem_vs_bandwidth']:.2f}", f"{r['engine_copy_vs_bandwidth']:.2f}",
                *([num(r["file_read_ms"], 2), f"{r['dir_vs_file_read']:.2f}"] if reads else []),
                *([num(r["verified_read_ms"], 2), f"{r['dir_vs_verified_read']:.2f}"] if checked else []),
                "yes" if r["exact"] else "**no**",
            ])
        out.append(f"**{m['file']}** ({m['dtype']}, {m['kv_bytes_per_token']:,} bytes of KV per token; "
                   f"bandwidth: {data['bandwidth']['what']}):\n")
        out.append(table(["tokens", "save ms", "restore dir ms", "restore mem ms",
                          *(["restore_session ms"] if whole else []), "engine copy ms", "MB",
                          "recompute ms", "speedup dir", "speedup mem", "bytes÷bw ms", "dir ÷ (bytes÷bw)",
                          "mem ÷ (bytes÷bw)", "copy ÷ (bytes÷bw)",
                          *(["file read ms", "dir ÷ file read"] if reads else []),
                          *(["read+xxh3 ms", "dir ÷ (read+xxh3)"] if checked else []), "exact"], rows))
        inc = [[f"{i['tokens']:,}", str(i["new_tokens"]), num(i["save_ms"], 1), f"{i['bytes_written']:,}",
                str(i["objects_written"]), str(i["chunks_reused"])] for i in data["incremental"]]
        out.append("\nSaving again after new tokens (only the new chunk, the logits and the manifest):\n")
        out.append(table(["on top of", "new tokens", "save ms", "bytes written", "objects written",
                          "chunks reused"], inc))
        load = data.get("load_average", {}).get("start")
        if load:
            out.append(f"\nLoad average when it started: {load[0]:.2f} on {data['environment']['cpu_count']} cores "
                       "(a machine shared with other jobs).")
        out.append("\n" + source_line(data) + "\n")
    return "\n".join(out)


def render_boundary(results: list[dict[str, Any]]) -> str:
    out = []
    for data in results:
        rows = [["guest (wasm → `dw_generate`)", num(data["guest_ms_per_token"], 3), num(data["guest_prefill_ms"], 1)],
                ["python (`Session.sample` / `decode`)", num(data["python_ms_per_token"], 3),
                 num(data["python_prefill_ms"], 1)]]
        out.append(f"**{Path(data['model']).name}** ({data['dtype']}), {data['prompt_tokens']}-token prompt, "
                   f"{data['generated_tokens']} tokens × {data['rounds']} interleaved rounds:\n")
        out.append(table(["driver", "decode ms/token", f"prefill {data['prompt_tokens']} ms"], rows))
        out.append(f"\nRatio guest ÷ python (median decode): **{data['ratio']:.4f}**; identical tokens: "
                   f"**{'yes' if data['same_tokens'] else 'no'}**.\n")
        out.append(source_line(data) + "\n")
    return "\n".join(out)


def render_decode(results: list[dict[str, Any]]) -> str:
    out = []
    for data in results:
        settings = data["settings"]
        lengths = [str(n) for n in settings["prefill_lengths"]]
        batches = [str(b) for b in settings.get("batches", [])]
        floor = any("floor_ms_per_token" in r for r in data["results"])
        header = ["model", "variant", "decode ms/token"] + (["floor ms"] if floor else []) + \
            [f"prefill {'/'.join(lengths)} ms"] + ([f"tok/s at batch {'/'.join(batches)}"] if batches else [])
        rows = []
        for r in data["results"]:
            name = Path(r.get("file") or data.get("model") or "").name
            prefill = r.get("prefill_ms") or {}
            row = [name, r["variant"], num(r["decode_ms_per_token"], 2 if r["decode_ms_per_token"] >= 10 else 3)]
            if floor:
                row.append(num(r.get("floor_ms_per_token"), 3))
            row.append(" / ".join(num(prefill.get(n), 1) for n in lengths) if prefill else "–")
            if batches:
                agg = r.get("aggregate_tokens_per_s") or {}
                row.append(" / ".join(num(agg.get(b), 0) for b in batches) if agg else "–")
            rows.append(row)
        env = data["environment"]
        what = f"batch 1 after a {settings['prompt_tokens']}-token prompt, median of {settings['rounds']} rounds"
        if env.get("gpu_copy_bandwidth_gb_s"):
            what += f"; device copy bandwidth {env['gpu_copy_bandwidth_gb_s']:,.0f} GB/s (floor = weight bytes ÷ that)"
        elif settings.get("threads"):
            what += f"; {settings['threads']} threads"
        out.append(f"Decode {what}:\n")
        out.append(table(header, rows))
        predicted = dict.fromkeys((r["variant"], r["prediction"]) for r in data["results"] if r.get("prediction"))
        if predicted:
            out.append("\nPredictions written before the run:\n")
            out += [f"- {variant}: {text}" for variant, text in predicted]
        out.append("\n" + source_line(data) + "\n")
    return "\n".join(out)


def render_engine_check(results: list[dict[str, Any]]) -> str:
    """scripts/gpu_engine_check.py: each check's measure per file, with its tolerance."""

    def measure(c: dict[str, Any]) -> str:
        for key in ("rel_err", "norm_err", "max_diff", "agreement"):
            if key in c:
                return f"{c[key]:.2g}" if key != "agreement" else f"{c[key]:.0%}"
        if "matching" in c:
            return f"{c['matching']}/{c['tokens']} tokens"
        return "ok" if c.get("ok") else "failed"

    out = []
    for data in results:
        files = data["files"]
        names = list(dict.fromkeys(k for f in files for k in f["checks"]))
        rows = []
        for name in names:
            cells = []
            for f in files:
                c = f["checks"].get(name)
                cells.append("–" if c is None else (measure(c) if c.get("ok") else f"**{measure(c)} (failed)**"))
            any_c = next(f["checks"][name] for f in files if name in f["checks"])
            limit = any_c.get("tol", any_c.get("min"))
            rows.append([name.replace("_", " "), *cells, "–" if limit is None else f"{limit:g}"])
        out.append(table(["check", *(f["file"] for f in files), "tolerance / minimum"], rows))
        out.append(f"\nAll checks passed: **{'yes' if data.get('ok') else 'no'}**.\n")
        out.append(source_line(data) + "\n")
    return "\n".join(out)


def render_step_profile(results: list[dict[str, Any]]) -> str:
    """scripts/gpu/step_profile.py: where a graph-replayed step's time goes, per file and batch."""
    out = []
    for data in results:
        rows = []
        for r in data["rows"]:
            kernels = {}
            for k in r["by_kernel"]:  # torch's elementwise kernels by their family
                name = k["name"].split("<")[0].removeprefix("void ").split("(")[0]
                kernels[name] = kernels.get(name, 0.0) + k["us_per_step"]
            top = sorted(kernels.items(), key=lambda kv: -kv[1])[:5]
            rows.append([Path(r["file"]).name, str(r["batch"]), num(r["step_ms_events"] * 1e3, 0),
                         f"{r['kernels_per_step']:g}", num(r["kernel_busy_us_per_step"], 0), num(r["gaps_us_per_step"], 0),
                         "; ".join(f"`{n}` {num(us, 0)}" for n, us in top)])
        out.append(table(["model", "batch", "step us (events)", "kernels", "kernel time us", "gaps us",
                          "largest kernels, us a step"], rows))
        out.append("\n" + source_line(data) + "\n")
    return "\n".join(out)


def render_int8_sweep(results: list[dict[str, Any]]) -> str:
    """scripts/gpu/int8_sweep.py: per format and row count, each product's kernel as decode picks it
    (µs in a CUDA graph) beside dequantize + cuBLAS, and the step's products (16 layers + the head)."""
    out = []
    shapes = ["qkv", "o", "gate_up", "down", "head"]
    fmt_name = {2: "Q4_0", 1: "Q8_0"}
    for data in results:
        rows = []
        for t in data.get("totals", []):
            cells = []
            for shape in shapes:
                here = [r for r in data["sweep"] if r["shape"] == shape and r["fmt"] == t["fmt"] and r["M"] == t["M"]
                        and "us" in r]
                now = here[0] if here else None  # the sweep times the configuration decode picks first
                mm = next((r for r in here if r["config"] == ["mm", 0]), None)
                cell = f"{now['config'][0]} {num(now['us'], 1)}" if now else "–"
                if now and mm and now is not mm:
                    cell += f" (mm {num(mm['us'], 1)})"
                cells.append(cell)
            rows.append([fmt_name[t["fmt"]], str(t["M"]), *cells, num(t["now_us"], 0)])
        out.append(table(["format", "rows", *shapes, "products a step, us"], rows))
        errs = {}
        for e in data.get("errors", []):
            if e["config"][0] in ("dp4a", "i8"):
                key = fmt_name[e["fmt"]]
                errs[key] = max(errs.get(key, 0.0), e["rel_err"])
        if errs:
            out.append("\nLargest error of an int8-activation product against float32 on the dequantized weights "
                       "(‖err‖ / ‖ref‖, gate_up with RMSNorm, down with SiLU · up and the residual): "
                       + ", ".join(f"{k} {v:.1e}" for k, v in errs.items()) + ".")
        out.append("\n" + source_line(data) + "\n")
    return "\n".join(out)


def render_restore_profile(results: list[dict[str, Any]]) -> str:
    out = []
    for data in results:
        rows = data["rows"]
        timed = [[name, num(r["median_ms"], 2), num(r["min_ms"], 2)] for name, r in rows.items() if "median_ms" in r]
        out.append(f"{data['tokens']:,} tokens of **{data['model']}** in {data['files']} chunk files "
                   f"({data['bytes'] / 1e6:,.1f} MB), {data['environment']['torch_threads']} threads:\n")
        out.append(table(["what", "median ms", "min ms"], timed))
        parts = {name.removeprefix("breakdown, "): r for name, r in rows.items() if name.startswith("breakdown, ")}
        if parts:
            keys = list(next(iter(parts.values())))
            out.append("\nOne restore (`load_session`, with `new_session` before it) part by part, host clock, "
                       "mean of 10 (each part timed through a wrapper, so the total runs a little slower):\n")
            out.append(table(["part", *(f"ms, {k}" for k in parts)],
                             [[k, *(num(p.get(k), 3) for p in parts.values())] for k in keys]))
        out.append("\n" + source_line(data) + "\n")
    return "\n".join(out)


RENDERERS: dict[str, Callable[[list[dict[str, Any]]], str]] = {
    "restore-profile": render_restore_profile,
    "int8-sweep": render_int8_sweep,
    "step-profile": render_step_profile,
    "gpu-engine-check": render_engine_check,
    "decode": render_decode,
    "zerocopy": render_zerocopy,
    "snapshot": render_snapshot,
    "boundary": render_boundary,
}


def render(text: str) -> str:
    def replace(m: re.Match[str]) -> str:
        name, kind = m.group("name"), None
        if name not in RENDERERS and name.rsplit("-", 1)[0] in RENDERERS:  # e.g. decode-cuda
            name, kind = name.rsplit("-", 1)
        if name not in RENDERERS:
            raise SystemExit(f"render_docs: no renderer for bench:{name}")
        results = [r for r in latest(name) if kind is None or r["environment"]["device"].split(":")[0] == kind]
        body = RENDERERS[name](results) if results else "*No committed results yet.*\n"
        return m.group(1) + body.rstrip("\n") + "\n" + m.group(4)

    return REGION.sub(replace, text)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--check", action="store_true", help="only check that the docs are up to date")
    args = p.parse_args()
    stale = []
    for doc in sorted(DOCS.glob("*.md")):
        text = doc.read_text()
        new = render(text)
        if new != text:
            stale.append(doc.relative_to(ROOT).as_posix())
            if not args.check:
                doc.write_text(new)
    if args.check and stale:
        print("render_docs: out of date: " + ", ".join(stale) + " (run python scripts/render_docs.py)")
        return 1
    if not args.check:
        print("render_docs: " + (", ".join(stale) if stale else "nothing changed"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
