"""Shared output for benchmarks: an environment record, a printed table, a JSON file."""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

RESULTS_DIR = Path("benchmarks") / "results"


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        import torch

        return torch.cuda.get_device_name(torch.device(device))
    return f"{cpu_model()} ({os.cpu_count()} cores)"


def environment(device: str) -> dict[str, Any]:
    """Where and how a benchmark ran: stored with every result."""
    import torch
    import wasmtime  # noqa: F401  (version below)

    from driftwood import __version__

    env: dict[str, Any] = {
        "date": _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "command": _command(),
        "device": device,
        "device_name": device_name(device),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "wasmtime": _version("wasmtime"),
        "driftwood": __version__,
        "platform": platform.platform(),
    }
    if device.startswith("cuda"):
        env["cuda"] = torch.version.cuda
        env["driver"] = _nvidia_driver()
    return env


def _version(dist: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return None


def _nvidia_driver() -> str | None:
    try:
        with open("/proc/driver/nvidia/version") as f:
            return f.readline().strip()
    except OSError:
        return None


def format_table(rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, str]]) -> str:
    """Render rows as an aligned text table. ``columns`` are (key, header) pairs."""
    cells = [[header for _, header in columns]]
    for row in rows:
        cells.append([_fmt(row.get(key)) for key, _ in columns])
    widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]
    lines = ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True)))
             for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if value == 0:
            return "0"
        if abs(value) >= 100:
            return f"{value:,.0f}"
        if abs(value) >= 1:
            return f"{value:.2f}"
        return f"{value:.3g}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def default_path(bench: str, device: str, env: dict[str, Any]) -> Path:
    day = env["date"][:10]
    return RESULTS_DIR / f"{bench}-{device.replace(':', '')}-{day}.json"


def write_json(result: dict[str, Any], path: str | os.PathLike[str]) -> Path:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(out.suffix + ".tmp")
    tmp.write_text(json.dumps(result, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, out)
    return out


def progress(message: str) -> None:
    """Progress for long benchmarks, on stderr so tables on stdout stay clean."""
    print(message, file=sys.stderr, flush=True)


def _command() -> str:
    """The command line as a user would type it (``driftwood ...`` however it was started)."""
    argv0 = Path(sys.argv[0])
    if argv0.name == "driftwood" or argv0.parts[-3:] == ("driftwood", "cli", "main.py"):
        return "driftwood " + shlex.join(sys.argv[1:])
    return shlex.join([Path(sys.executable).name, *sys.argv])
