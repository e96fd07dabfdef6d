"""The models actors may open, by name: loaded once per process and shared by every actor.

Names come from ``--model M`` (registered as ``default`` and under M itself) and from
``--nn-preload NAME:GGML:AUTO:PATH``. Nothing is loaded until a guest first opens the name.
Sessions are not shared: each actor keeps its own in its host modules' handle tables.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Generic, TypeVar

from driftwood.errors import DriftwoodError, ModelError

if TYPE_CHECKING:
    from driftwood.model import Model


@dataclass(frozen=True)
class Preload:
    """One ``--nn-preload NAME:ENCODING:TARGET:PATH`` entry (WasmEdge's syntax)."""

    name: str
    encoding: str
    target: str
    path: str

    @classmethod
    def parse(cls, text: str) -> Preload:
        parts = text.split(":")
        if len(parts) < 4 or not all(parts[:3]) or not parts[3]:
            raise DriftwoodError(f"--nn-preload {text!r}: expected NAME:GGML:AUTO:PATH")
        name, encoding, target = parts[:3]
        if encoding.upper() != "GGML":
            raise DriftwoodError(f"--nn-preload {text!r}: only the GGML encoding is supported, not {encoding!r}")
        return cls(name, encoding.upper(), target.upper(), ":".join(parts[3:]))


class ModelPool:
    """Named models on one device, loaded on first use."""

    def __init__(self, device: str = "cpu", dtype: str | None = None, progress: bool = False) -> None:
        self.device = device
        self.dtype = dtype
        self.progress = progress
        self._specs: dict[str, str] = {}
        self._loaded: dict[str, Model] = {}
        self._by_spec: dict[str, Model] = {}
        self._lock = threading.Lock()

    def add(self, name: str, spec: str) -> None:
        """Register ``name`` for a model spec (a GGUF path or a registry name like smollm2)."""
        self._specs[name] = spec

    def add_preload(self, preload: Preload) -> None:
        self.add(preload.name, preload.path)

    def __contains__(self, name: str) -> bool:
        return name in self._specs

    def names(self) -> list[str]:
        return list(self._specs)

    def spec(self, name: str) -> str:
        try:
            return self._specs[name]
        except KeyError:
            raise ModelError(f"no model named {name!r} (known: {', '.join(self._specs) or 'none'})") from None

    def get(self, name: str) -> Model:
        """The model registered as ``name``, loading it on first use (raises ModelError)."""
        spec = self.spec(name)
        with self._lock:
            model = self._loaded.get(name) or self._by_spec.get(spec)
            if model is None:
                from driftwood.model import load_model

                model = load_model(spec, device=self.device, dtype=self.dtype, progress=self.progress)
                self._by_spec[spec] = model
            self._loaded[name] = model
            return model


T = TypeVar("T")


class Handles(Generic[T]):
    """A per-actor table of guest-visible handles (small integers, counting up from ``first``).

    Tables are per actor, so one actor can never name another's objects; a closed handle is
    never reused within the actor's lifetime, so a stale handle fails instead of aliasing.
    """

    def __init__(self, first: int = 1, limit: int = 64) -> None:
        self._next = first
        self._items: dict[int, T] = {}
        self.limit = limit

    def add(self, item: T) -> int:
        if len(self._items) >= self.limit:
            raise OverflowError(f"at most {self.limit} open handles")
        handle = self._next
        self._next += 1
        self._items[handle] = item
        return handle

    def put(self, handle: int, item: T) -> None:
        """Place ``item`` under a known handle (restoring a snapshot)."""
        self._items[handle] = item
        self._next = max(self._next, handle + 1)

    @property
    def next_handle(self) -> int:
        """The handle the next :meth:`add` returns."""
        return self._next

    def skip_to(self, handle: int) -> None:
        """Never hand out handles below ``handle`` (restoring a snapshot)."""
        self._next = max(self._next, handle)

    def get(self, handle: int) -> T | None:
        return self._items.get(handle)

    def pop(self, handle: int) -> T | None:
        return self._items.pop(handle, None)

    def items(self) -> Iterator[tuple[int, T]]:
        return iter(list(self._items.items()))

    def __len__(self) -> int:
        return len(self._items)
