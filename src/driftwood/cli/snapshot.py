"""``driftwood snapshot ls|inspect|verify|rm``: look after a snapshot directory.

A snapshot is named ``DIR/NAME`` (``DIR`` is the store given to ``--snapshot-dir``); ``DIR``
alone names its only snapshot. See docs/snapshot-format.md.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import TYPE_CHECKING

from driftwood.errors import SnapshotError

if TYPE_CHECKING:
    from driftwood.snapshot.store import DirectoryStore


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("snapshot", help="list, inspect, verify or remove snapshots",
                       description=__doc__.splitlines()[0] if __doc__ else None)
    cmds = p.add_subparsers(dest="snapshot_command", required=True, metavar="ACTION")

    ls = cmds.add_parser("ls", help="list the snapshots in a directory")
    ls.add_argument("dir", help="a snapshot directory")
    ls.add_argument("--json", action="store_true", help="print JSON")
    ls.set_defaults(func=list_snapshots)

    inspect = cmds.add_parser("inspect", help="show a snapshot's header")
    inspect.add_argument("snapshot", help="DIR/NAME")
    inspect.add_argument("--json", action="store_true", help="print the whole header as JSON (token ids included)")
    inspect.set_defaults(func=inspect_snapshot)

    verify = cmds.add_parser("verify", help="check every byte of snapshots against their checksums")
    verify.add_argument("snapshot", nargs="+", help="DIR/NAME, or DIR for all of its snapshots")
    verify.add_argument("--key", metavar="FILE", help="also require a valid signature made with this HMAC key")
    verify.set_defaults(func=verify_snapshots)

    rm = cmds.add_parser("rm", help="remove snapshots (and the chunks no other snapshot uses)")
    rm.add_argument("snapshot", nargs="+", help="DIR/NAME")
    rm.set_defaults(func=remove_snapshots)


def resolve_snapshot(ref: str, *, all_if_dir: bool = False) -> tuple[DirectoryStore, list[str]]:
    """``DIR/NAME`` -> (store, [NAME]); ``DIR`` -> its only snapshot (or all, ``all_if_dir``)."""
    from driftwood.snapshot.store import parse_ref

    store, name = parse_ref(ref)
    if name is not None:
        return store, [name]
    names = store.names()
    if all_if_dir:
        return store, names
    if len(names) != 1:
        raise SnapshotError(f"{ref} holds {len(names)} snapshots ({', '.join(names) or 'none'}): name one as {ref}/NAME")
    return store, names


def list_snapshots(args: argparse.Namespace) -> int:
    from driftwood.bench.report import format_table
    from driftwood.snapshot.store import DirectoryStore

    store = DirectoryStore(args.dir)
    rows = []
    for name in store.names():
        try:
            m = store.manifest(name)
        except SnapshotError as exc:
            rows.append({"name": name, "kind": "unreadable", "created": str(exc)[:60]})
            continue
        rows.append({"name": name, "kind": m.kind, "created": m.created[:19].replace("T", " "),
                     "sessions": len(m.sessions), "tokens": sum(s.position for s in m.sessions),
                     "bytes": sum(o.size for o in m.objects()), "signed": m.signed})
    if args.json:
        print(json.dumps(rows, indent=2))
    elif rows:
        print(format_table(rows, [("name", "name"), ("kind", "kind"), ("created", "created (UTC)"),
                                  ("sessions", "sessions"), ("tokens", "tokens"), ("bytes", "bytes"),
                                  ("signed", "signed")]))
    else:
        print(f"no snapshots in {args.dir}", file=sys.stderr)
    return 0


def inspect_snapshot(args: argparse.Namespace) -> int:
    from driftwood.snapshot.verify import summary

    store, (name,) = resolve_snapshot(args.snapshot)
    manifest = store.manifest(name)
    print(json.dumps(manifest.to_header() if args.json else summary(manifest), indent=2))
    return 0


def verify_snapshots(args: argparse.Namespace) -> int:
    from driftwood.snapshot.sign import read_key
    from driftwood.snapshot.verify import verify

    key = read_key(args.key)
    failed = 0
    for ref in args.snapshot:
        store, names = resolve_snapshot(ref, all_if_dir=True)
        for name in names:
            try:
                report = verify(store, name, key)
            except SnapshotError as exc:
                print(f"{name}: FAILED: {exc}")
                failed += 1
                continue
            signed = ", signed" if report.manifest.signed else ""
            print(f"{name}: ok ({report.objects} objects, {report.bytes:,} bytes{signed})")
    return 1 if failed else 0


def remove_snapshots(args: argparse.Namespace) -> int:
    stores = {}
    for ref in args.snapshot:
        store, (name,) = resolve_snapshot(ref)
        store.delete(name)
        stores[store.uri] = store
        print(f"removed {name}")
    for store in stores.values():
        report = store.gc()
        if report.removed:
            print(f"freed {report.freed:,} bytes in {report.removed} objects no snapshot uses")
    return 0
