"""Actors: one guest module instantiated in its own store, with its limits and host modules.

An actor owns a Wasmtime store (so its own linear memory, an arena), a WASI context that
grants nothing by default (no files unless a directory is mapped, no network, no inherited
environment), and host modules bound to its memory. Several actors live in one process; they
share engines and models, never memories or sessions.
"""

from __future__ import annotations

import atexit
import ctypes
import os
import sys
import time
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import wasmtime

from driftwood.errors import GuestError, GuestTrap, LimitExceeded
from driftwood.memory.backends import Backend, get_backend
from driftwood.memory.creator import CREATOR, InstantiationSettings
from driftwood.runtime.engine import ticks
from driftwood.runtime.hostcall import GuestMemory, HostModule, take_pending_exception
from driftwood.runtime.module import GuestModule

if TYPE_CHECKING:
    from driftwood.memory.arena import Arena

MiB = 1 << 20
_NO_DEADLINE = 1 << 62
# Stores still open at interpreter exit are closed first: dropping one during finalization
# can run WASI output callbacks on Wasmtime's threads after Python is gone (an abort).
_live: weakref.WeakSet[Actor] = weakref.WeakSet()
# Dropping a store hands its WASI streams' last work to a Tokio worker thread inside Wasmtime;
# a process that exits while such a thread is still starting aborts ("panic in a function that
# cannot unwind", measured in 1 of 4 runs of `driftwood demo gemm`). Exit waits this long after
# the last store was dropped (0 of 36 runs aborted with it).
SETTLE_S = 0.2
_last_drop = 0.0


@atexit.register
def _close_live_actors() -> None:
    for actor in list(_live):
        actor.close()
    wait = _last_drop + SETTLE_S - time.monotonic()
    if _last_drop and wait > 0:
        time.sleep(wait)


class DeadlineExceeded(Exception):
    """Raised inside a host call when the actor's time is up; it traps the guest.

    Deliberately not a DriftwoodError, so that host modules never turn it into an error code.
    """


@dataclass(frozen=True)
class Limits:
    """What one actor may consume. ``None`` means unlimited."""

    max_memory: int = 1024 * MiB  # bytes of linear memory (a module declaring more is refused)
    fuel: int | None = None  # wasm fuel units for each call into the guest
    timeout: float | None = None  # wall-clock seconds for each call into the guest


Output = str | Callable[[bytes], Any] | None  # "inherit", a file path, a callback, or nothing


@dataclass
class WasiOptions:
    """The guest's WASI world. Nothing is granted unless named here."""

    args: Sequence[str] = ()
    env: dict[str, str] = field(default_factory=dict)
    stdin: str | None = None  # "inherit", a file path, or None (empty)
    stdout: Output = "inherit"
    stderr: Output = "inherit"
    dirs: Sequence[tuple[str, str]] = ()  # (host path, guest path)


HostModuleFactory = Callable[["Actor"], HostModule]


class Actor:
    """A guest instance with its own store, memory, limits and host modules."""

    def __init__(
        self,
        module: GuestModule,
        *,
        device: str = "cpu",
        limits: Limits | None = None,
        wasi: WasiOptions | None = None,
        host_modules: Sequence[HostModuleFactory] = (),
    ) -> None:
        self.module = module
        self.limits = limits or Limits()
        if self.limits.fuel is not None and not module.fuel:
            raise GuestError("a fuel limit needs the module compiled with fuel metering (GuestModule.load(fuel=True))")
        self.backend: Backend = get_backend(device)
        self.store = wasmtime.Store(module.engine)
        self.store.set_limits(memory_size=self.limits.max_memory)
        self.store.set_epoch_deadline(_NO_DEADLINE)
        if self.limits.fuel is not None:
            self.store.set_fuel(self.limits.fuel)  # instantiation (start functions) burns fuel too
        self.deadline: float | None = None
        self._wasi(wasi or WasiOptions())
        self.hosts = [make(self) for make in host_modules]
        linker = wasmtime.Linker(module.engine)
        linker.define_wasi()
        for host in self.hosts:
            host.define(linker)
        settings = InstantiationSettings(limit=self.limits.max_memory)
        with CREATOR.instantiating(settings):
            try:
                self.instance = linker.instantiate(self.store, module.module)
            except wasmtime.WasmtimeError as exc:
                raise GuestError(_instantiation_message(module, exc)) from exc
            except wasmtime.Trap as exc:
                raise _trap_error(exc, self) from exc
        self.exports = self.instance.exports(self.store)
        _live.add(self)
        memory = self.exports.get("memory")
        self.arena: Arena | None = None
        self.memory: GuestMemory | None = None
        if isinstance(memory, wasmtime.Memory):
            self.arena = CREATOR.arena_at(_data_ptr(memory, self.store))
            self.backend.attach(self.arena)
            self.memory = GuestMemory(self.arena, self.backend)
            for host in self.hosts:
                host.bind(self.memory)
        if "_initialize" in self.exports:  # a reactor module
            self.call("_initialize")

    # -- running ---------------------------------------------------------------------------

    def run(self) -> int:
        """Run the command's ``_start``; returns its exit code (0 when it just returns)."""
        if "_start" not in self.exports:
            raise GuestError(f"{self.module.name} has no _start export: it is not a WASI command")
        try:
            self.call("_start")
        except wasmtime.ExitTrap as exit_:
            return exit_.code
        return 0

    def call(self, name: str, *args: Any) -> Any:
        """Call an exported function under the actor's fuel and time limits."""
        func = self.exports.get(name)
        if not isinstance(func, wasmtime.Func):
            raise GuestError(f"{self.module.name} exports no function {name!r}")
        if self.limits.fuel is not None:
            self.store.set_fuel(self.limits.fuel)
        if self.limits.timeout is not None:
            self.deadline = time.monotonic() + self.limits.timeout
            self.store.set_epoch_deadline(ticks(self.limits.timeout))
        try:
            try:
                return func(self.store, *args)
            except (wasmtime.Trap, wasmtime.WasmtimeError):  # a host trap may surface as either
                pending = take_pending_exception()  # a host function trapped the guest
                if pending is not None:
                    raise pending from None
                raise
        except wasmtime.ExitTrap:
            raise
        except wasmtime.Trap as trap:
            raise _trap_error(trap, self) from None
        except DeadlineExceeded:
            raise LimitExceeded(f"{self.module.name} exceeded its time limit of {self.limits.timeout:g} s") from None
        except wasmtime.WasmtimeError as exc:
            raise GuestError(f"{self.module.name}: {str(exc).strip().splitlines()[0]}") from None
        finally:
            self.deadline = None
            self.store.set_epoch_deadline(_NO_DEADLINE)

    def write_stdout(self, data: bytes) -> None:
        """Write to the guest's stdout as configured (host-side streaming, e.g. wasi-nn)."""
        target = self._stdout
        if target == "inherit":
            sys.stdout.flush()
            sys.stdout.buffer.write(data)
            sys.stdout.buffer.flush()
        elif callable(target):
            target(data)
        elif target is not None:
            with open(target, "ab") as f:
                f.write(data)

    def check_deadline(self) -> None:
        """Host calls that run long (token loops) call this between steps."""
        if self.deadline is not None and time.monotonic() > self.deadline:
            raise DeadlineExceeded

    def close(self) -> None:
        """Drop the store: Wasmtime then releases the arena (and its device registration)."""
        _live.discard(self)
        for host in self.hosts:
            close = getattr(host, "close", None)
            if close:
                close()
        self.hosts = []
        self.memory = None
        self.arena = None
        self.exports = None  # type: ignore[assignment]
        self.instance = None  # type: ignore[assignment]
        if self.store is not None:
            global _last_drop
            self.store = None  # type: ignore[assignment]
            _last_drop = time.monotonic()

    def __enter__(self) -> Actor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- setup -----------------------------------------------------------------------------

    def _wasi(self, options: WasiOptions) -> None:
        self._stdout = options.stdout
        config = wasmtime.WasiConfig()
        config.argv = [self.module.name, *options.args]
        config.env = list(options.env.items())
        if options.stdin == "inherit":
            config.inherit_stdin()
        elif options.stdin is not None:
            config.stdin_file = options.stdin
        _output(config, "stdout", options.stdout)
        _output(config, "stderr", options.stderr)
        for host_path, guest_path in options.dirs:
            if not Path(host_path).is_dir():
                raise GuestError(f"--dir {host_path}::{guest_path}: {host_path} is not a directory")
            config.preopen_dir(os.fspath(host_path), guest_path)
        self.store.set_wasi(config)


def _output(config: wasmtime.WasiConfig, stream: str, target: Output) -> None:
    if target == "inherit":
        getattr(config, f"inherit_{stream}")()
    elif callable(target):
        setattr(config, f"{stream}_custom", target)
    elif target is not None:
        setattr(config, f"{stream}_file", str(target))


def _data_ptr(memory: wasmtime.Memory, store: wasmtime.Store) -> int:
    return ctypes.addressof(memory.data_ptr(store).contents)


def _instantiation_message(module: GuestModule, exc: wasmtime.WasmtimeError) -> str:
    text = str(exc).strip()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    for line in lines:
        if "unknown import" in line:
            return f"{module.name} needs an import the host does not provide: {line.split('unknown import:')[-1].strip()}"
    detail = "; ".join(lines[:3]) if lines else "unknown error"
    return f"cannot instantiate {module.name}: {detail}"


def _trap_error(trap: wasmtime.Trap, actor: Actor) -> GuestError:
    code = trap.trap_code
    name = actor.module.name
    if code == wasmtime.TrapCode.OUT_OF_FUEL:
        return LimitExceeded(f"{name} ran out of fuel ({actor.limits.fuel} units)")
    if code == wasmtime.TrapCode.INTERRUPT:
        return LimitExceeded(f"{name} exceeded its time limit of {actor.limits.timeout:g} s")
    return GuestTrap(f"{name} trapped: {_trap_reason(trap)}", _backtrace(trap))


def _trap_reason(trap: wasmtime.Trap) -> str:
    """One line: Wasmtime's 'wasm trap: ...' cause, with the detail before it if any."""
    text = trap.message
    causes = text.split("Caused by:", 1)[1] if "Caused by:" in text else ""
    lines = [ln.strip().split(":", 1)[1].strip() if ln.strip()[:1].isdigit() else ln.strip()
             for ln in causes.splitlines() if ln.strip()]
    reason = next((ln.removeprefix("wasm trap: ") for ln in reversed(lines) if ln.startswith("wasm trap:")), None)
    detail = [ln for ln in lines if not ln.startswith("wasm trap:")]
    if reason is None:
        first = text.strip().splitlines()[0] if text.strip() else ""
        reason = str(trap.trap_code.name).lower().replace("_", " ") if trap.trap_code else first or "trap"
    return f"{reason} ({'; '.join(detail)})" if detail else reason


def _backtrace(trap: wasmtime.Trap) -> str:
    frames = []
    for i, frame in enumerate(trap.frames):
        where = frame.func_name or f"wasm function {frame.func_index}"
        frames.append(f"  {i}: {frame.module_name or '<module>'}!{where} at offset {frame.module_offset:#x}")
    return "\n".join(frames)
