"""`sequencer portal`, `portal add-user` and `portal add-token`, run as a user runs them."""

from __future__ import annotations

import datetime as dt
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from reports.storage.mongo import MongoSettings
from sequencer.cli import main
from tests import records_factory as rf
from tests.mongo_support import database
from tests.store_support import store_runs
from web.auth import AuthStore, Role

ROOT = Path(__file__).resolve().parent.parent


def sequencer(*argv: str, stdin: str = "", env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "sequencer.cli", *argv], input=stdin, capture_output=True,
                          text=True, cwd=ROOT, timeout=60, env={**os.environ, **(env or {})})


def test_add_user_reads_the_password_from_standard_input_and_keeps_only_its_argon2_hash(
        mongo: MongoSettings) -> None:
    where = ["--mongo", mongo.uri, "--mongo-db", mongo.database]
    done = sequencer("portal", "add-user", "alice", "--role", "quality", *where, stdin="correct horse\n")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "portal: added user alice (quality)"
    stored = database(mongo)["portal_users"].find_one({"_id": "alice"})
    assert stored["role"] == "quality" and stored["password_hash"].startswith("$argon2id$")
    assert "correct horse" not in done.stdout + done.stderr + str(stored)
    auth = AuthStore(database(mongo))
    assert auth.login("alice", "correct horse", "127.0.0.1") == auth.user("alice")
    again = sequencer("portal", "add-user", "alice", "--role", "admin", *where, stdin="new one\n")
    assert again.stdout.strip() == "portal: updated user alice (admin)"
    assert auth.login("alice", "correct horse", "127.0.0.1") is None
    assert auth.login("alice", "new one", "127.0.0.1").role is Role.ADMIN  # type: ignore[union-attr]


def test_add_token_prints_the_token_once_as_the_last_line_and_keeps_its_hash(mongo: MongoSettings) -> None:
    done = sequencer("portal", "add-token", "mes", "--role", "viewer", "--mongo", mongo.uri,
                     "--mongo-db", mongo.database)
    assert done.returncode == 0, done.stderr
    token = done.stdout.strip().splitlines()[-1]
    assert re.fullmatch(r"sqp_[A-Za-z0-9_-]{43}", token)
    principal = AuthStore(database(mongo)).principal_for_token(token)
    assert principal is not None and (principal.name, principal.role) == ("mes", Role.VIEWER)
    assert token not in str(list(database(mongo)["portal_api_tokens"].find()))


@pytest.mark.parametrize(("argv", "message"), [
    (["portal", "add-user", "bob", "--role", "boss", "--mongo", "mongodb://127.0.0.1:1"],
     "--role: 'boss' is not a role (one of viewer, operator, quality, admin)"),
    (["portal", "add-user", " bob", "--role", "viewer", "--mongo", "mongodb://127.0.0.1:1"], "is not a user name"),
    (["portal", "--store", "x.sqlite", "--host", "0.0.0.0"], "binds loopback only"),
    (["portal", "--store", "missing.sqlite"], "--store missing.sqlite: no such store"),
    (["portal"], "say where the records are"),
    (["portal", "--port", "70000", "--mongo", "mongodb://127.0.0.1:1"], "--port: 70000 is not a port number"),
])
def test_bad_options_are_one_line_and_exit_2(argv: list[str], message: str, capsys: pytest.CaptureFixture[str],
                                             monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("SEQUENCER_MONGO_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("sequencer: error: ") and message in err, err


@pytest.mark.slow
async def test_a_bench_portal_serves_a_stations_store_read_only(tmp_path: Path) -> None:
    store = tmp_path / "store.sqlite"
    recently = dt.datetime.now(dt.timezone.utc) - dt.timedelta(minutes=3)
    await store_runs(store, [rf.sensor_run("SN-1", started_at=recently),
                             rf.sensor_run("SN-2", vdd=3.5, slot=1, started_at=recently)])
    proc = subprocess.Popen([sys.executable, "-m", "sequencer.cli", "portal", "--store", str(store), "--port", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        url = re.search(r"(http://\S+) over ", line)
        assert url, line + proc.stderr.read() if proc.stderr else line
        async with httpx.AsyncClient(base_url=url.group(1)) as http:
            page = await http.get("/search", params={"serial": "SN-2"})
            assert page.status_code == 200 and "SN-2" in page.text and "read-only" in page.text
            assert 'href="/devices/SN-1"' not in page.text
            mac = rf.sensor_run("SN-1").dut["mac"].upper()
            body = (await http.get("/api/v1/devices", params={"mac": mac})).json()
            assert [d["serial"] for d in body["devices"]] == ["SN-1"]
            assert [r["outcome"] for r in body["devices"][0]["runs"]] == ["PASS"]
            device = await http.get("/devices/SN-2")
            assert 'id="add-note"' not in device.text
            assert (await http.post("/devices/SN-2/notes", data={"text": "x"})).status_code == 403
            board = await http.get("/board")
            assert board.status_code == 200 and 'data-station="line1-st03"' in board.text
            assert re.search(r'data-slot="1">.*?SN-2.*?FAIL', board.text, re.S)
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
