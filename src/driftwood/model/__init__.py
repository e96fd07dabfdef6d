"""The inference engine: GGUF Llama-family models in torch. Knows nothing about Wasm."""

from driftwood.model.engine import Model, Session, load_model
from driftwood.model.sampling import SamplingParams

__all__ = ["Model", "SamplingParams", "Session", "load_model"]
