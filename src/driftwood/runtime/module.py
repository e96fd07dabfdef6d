"""Guest modules: validated, compiled once per engine, identified by the hash of their bytes."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import wasmtime

from driftwood.errors import GuestError
from driftwood.runtime.engine import get_engine


@dataclass(frozen=True)
class GuestModule:
    """A compiled guest. ``digest`` (sha256 of the bytes) names it in snapshots."""

    name: str
    wasm: bytes
    digest: str
    module: wasmtime.Module
    engine: wasmtime.Engine
    fuel: bool

    @classmethod
    def load(cls, source: str | os.PathLike[str] | bytes | bytearray, *, fuel: bool = False, name: str | None = None) -> GuestModule:
        """Compile a module from a path or bytes; a malformed module raises GuestError."""
        if isinstance(source, bytes | bytearray):
            wasm, label = bytes(source), name or "<bytes>"
        else:
            path = Path(source)
            try:
                wasm = path.read_bytes()
            except OSError as exc:
                raise GuestError(f"cannot read guest module {path}: {exc.strerror}") from exc
            label = name or path.name
        if wasm[:4] != b"\0asm":
            raise GuestError(f"{label} is not a WebAssembly module (bad magic bytes)")
        engine = get_engine(fuel=fuel)
        try:
            module = wasmtime.Module(engine, wasm)
        except wasmtime.WasmtimeError as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else "invalid module"
            raise GuestError(f"{label} is not a valid WebAssembly module: {first}") from exc
        return cls(label, wasm, hashlib.sha256(wasm).hexdigest(), module, engine, fuel)

    def imports(self) -> list[tuple[str, str]]:
        return [(imp.module, imp.name or "") for imp in self.module.imports]

    def exports(self) -> list[str]:
        return [exp.name for exp in self.module.exports]
