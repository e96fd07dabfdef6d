"""Wasmtime engines whose every linear memory is an arena.

One engine per option set (fuel metering on or off), shared by all actors in the process:
compiled modules are engine-specific, and engines are expensive. Epoch interruption is always
on; a daemon thread advances the epoch every ``EPOCH_TICK`` seconds so per-store deadlines
(``Store.set_epoch_deadline``) turn into wall-clock time limits.
"""

from __future__ import annotations

import functools
import threading
import time
import weakref

import wasmtime

from driftwood.memory.creator import CREATOR

EPOCH_TICK = 0.005  # seconds per epoch tick


class _EpochTicker(threading.Thread):
    def __init__(self, engine: wasmtime.Engine) -> None:
        super().__init__(name="driftwood-epoch", daemon=True)
        self._engine = weakref.ref(engine)

    def run(self) -> None:
        while (engine := self._engine()) is not None:
            engine.increment_epoch()
            del engine
            time.sleep(EPOCH_TICK)


@functools.cache
def get_engine(*, fuel: bool = False) -> wasmtime.Engine:
    """The shared engine for this option set, with the arena memory creator installed."""
    config = wasmtime.Config()
    CREATOR.install(config)
    # Copy-on-write memory images need Wasmtime's own mmaps; with a host memory creator
    # Wasmtime panics on modules with data segments (wasmtime 40-50), so initialise eagerly.
    config.memory_init_cow = False
    config.epoch_interruption = True
    config.consume_fuel = fuel
    config.cranelift_opt_level = "speed"
    engine = wasmtime.Engine(config)
    _EpochTicker(engine).start()
    return engine


def ticks(seconds: float) -> int:
    """Epoch ticks covering ``seconds`` (at least one)."""
    return max(1, int(seconds / EPOCH_TICK + 0.999))
