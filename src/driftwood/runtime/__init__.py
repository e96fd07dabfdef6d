"""The Wasm runtime: actors (a guest in its own store, with limits) and the host ABIs.

- :mod:`~driftwood.runtime.engine` — shared Wasmtime engines with the arena memory creator.
- :mod:`~driftwood.runtime.module` — compiled, hashed guest modules.
- :mod:`~driftwood.runtime.actor` — an instance with its store, WASI world and limits.
- :mod:`~driftwood.runtime.hostcall` — host functions over bounds-checked guest memory.
- :mod:`~driftwood.runtime.abi` — ``driftwood`` (native) and ``wasi_ephemeral_nn``.
- :mod:`~driftwood.runtime.models` — the named models actors may open.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from driftwood.runtime.abi.native import SessionLimits
    from driftwood.runtime.actor import Actor, Limits, WasiOptions
    from driftwood.runtime.models import ModelPool
    from driftwood.runtime.module import GuestModule


@dataclass
class ActorSpec:
    """Everything needed to start (or restart, from a snapshot) an actor."""

    module: GuestModule
    pool: ModelPool
    device: str = "cpu"
    limits: Limits | None = None
    wasi: WasiOptions | None = None
    sessions: SessionLimits | None = None
    extra: dict[str, object] = field(default_factory=dict)


def spawn(spec: ActorSpec) -> Actor:
    """An actor with both host ABIs bound to ``spec.pool``."""
    from driftwood.runtime.abi.native import NativeABI
    from driftwood.runtime.abi.wasi_nn import WasiNN
    from driftwood.runtime.actor import Actor

    return Actor(
        spec.module,
        device=spec.device,
        limits=spec.limits,
        wasi=spec.wasi,
        host_modules=[
            lambda actor: NativeABI(actor, spec.pool, spec.sessions),
            lambda actor: WasiNN(actor, spec.pool),
        ],
    )
