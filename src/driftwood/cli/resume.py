"""``driftwood resume SNAPSHOT``: continue an actor from a whole-actor snapshot.

A new instance of the snapshot's own module (kept in the snapshot directory) gets the saved
linear memory, globals and sessions, and its ``_start`` runs again with ``dw_resumed()``
returning 1: the guest picks up its state from its memory (the wasm call stack is not saved).
Models default to the ones the snapshot was taken with; another model is refused. Snapshots
it takes go back to the same directory and name unless ``--snapshot-dir`` says otherwise.
"""

from __future__ import annotations

import argparse
import sys

from driftwood.cli.run import actor_spec, add_actor_arguments
from driftwood.errors import GuestTrap, SnapshotError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("resume", help="continue an actor from its snapshot",
                       description=__doc__.splitlines()[0] if __doc__ else None)
    add_actor_arguments(p)
    p.set_defaults(model=None)  # the snapshot's own
    p.add_argument("snapshot", help="DIR/NAME, or DIR when it holds one snapshot")
    p.add_argument("args", nargs=argparse.REMAINDER, help="arguments for the guest (default: the snapshotted run's)")
    p.set_defaults(func=resume)


def resume(args: argparse.Namespace) -> int:
    from driftwood.cli.snapshot import resolve_snapshot
    from driftwood.runtime.module import GuestModule
    from driftwood.snapshot.actor import module_bytes
    from driftwood.snapshot.actor import resume as resume_actor
    from driftwood.snapshot.sign import read_key
    from driftwood.snapshot.store import DirectoryStore

    store, (name,) = resolve_snapshot(args.snapshot)
    key = read_key(args.snapshot_key)
    manifest = store.manifest(name, key)
    if manifest.actor is None:
        raise SnapshotError(f"{args.snapshot} is a session snapshot; `driftwood resume` takes actor snapshots")
    module = GuestModule.load(module_bytes(store, manifest, key), fuel=args.fuel is not None,
                              name=manifest.actor.module_name)
    recorded = {s.model.name: s.model.spec for s in manifest.sessions if s.model.name and s.model.spec}
    if args.model is None:
        args.model = recorded.get("default", "smollm2")
    guest_args = args.args[1:] if args.args[:1] == ["--"] else args.args
    spec = actor_spec(args, guest_args or list(manifest.actor.args), module)
    for model_name, model_spec in recorded.items():
        if model_name not in spec.pool:
            spec.pool.add(model_name, model_spec)
    save_to = DirectoryStore(args.snapshot_dir, create=True) if args.snapshot_dir else store
    try:
        return resume_actor(spec, store, name, key=key, manifest=manifest, save_to=save_to)
    except GuestTrap as trap:
        print(f"driftwood: error: {trap}", file=sys.stderr)
        if args.backtrace and trap.backtrace:
            print("wasm backtrace:\n" + trap.backtrace, file=sys.stderr)
        return 1
