"""tools/drills.py: its counting tells each kind of trouble apart, and the smallest drill run passes."""

from __future__ import annotations

import datetime as dt
import subprocess
import sys
from pathlib import Path

import attrs
import pytest

from reports.storage.mongo import MongoSettings
from tests import records_factory as rf
from tests.mongo_support import database, ship_all
from tests.store_support import store_runs
from tools.drills import count

ROOT = Path(__file__).resolve().parent.parent


async def test_count_names_the_runs_lost_duplicated_stale_behind_and_ahead(
    tmp_path: Path, mongo: MongoSettings
) -> None:
    path = tmp_path / "store.sqlite"
    t0 = rf.T0
    runs = [rf.sensor_run(f"SN-{i}", slot=i, started_at=t0 + dt.timedelta(minutes=i)) for i in range(6)]
    still_open = attrs.evolve(rf.sensor_run("SN-OPEN", slot=7, started_at=t0), outcome=None, ended_at=None)
    await store_runs(path, runs)
    await ship_all(path, mongo)
    db = database(mongo)
    clean = count(path, db)
    assert (clean.runs, clean.shipped, clean.problems) == (6, 6, {})

    ids = [r.run_id for r in runs]
    db.runs.delete_one({"_id": ids[0]})  # never reached MongoDB
    ghost = db.runs.find_one({"_id": ids[1]})
    db.runs.insert_one({**ghost, "_id": "ghost"})  # the same test under a second id, unknown to the store
    db.runs.update_one({"_id": ids[2]}, {"$inc": {"seq": -1}})  # an older change
    db.runs.update_one({"_id": ids[3]}, {"$inc": {"seq": 1}})  # a change the store does not have
    db.runs.update_one({"_id": ids[4]}, {"$set": {"outcome": None}})  # left open in MongoDB
    entry = db.devices.find_one({"_id": "SN-5"})["runs"][0]
    db.devices.update_one({"_id": "SN-5"}, {"$push": {"runs": entry}})  # the device lists its run twice
    await store_runs(path, [still_open])  # open in the store, and not shipped
    tally = count(path, db)
    db.client.close()

    assert tally.runs == 7 and tally.shipped == 6
    assert tally.not_shipped == tuple(sorted([ids[0], still_open.run_id]))
    assert tally.not_stored == ("ghost",)
    assert set(tally.lost) == {ids[0], still_open.run_id, "ghost"}
    assert set(tally.duplicated) == {ids[1], "ghost", ids[5]}
    assert set(tally.stale) == {ids[4], still_open.run_id}
    assert tally.behind == (ids[2],) and tally.ahead == (ids[3],)
    assert set(tally.devices_off) == {"SN-5", "SN-OPEN"}  # listed twice; none shipped for the open run


@pytest.mark.slow
def test_the_smallest_drills_run_end_to_end_and_find_nothing(tmp_path: Path) -> None:
    # One drill of each kind on two simulated boards: the script must keep
    # working as the station changes, and the station must pass its drills.
    done = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "drills.py"), "--each", "1", "--sim", "2", "--rounds", "4",
         "--window", "1", "--outage", "0.5", "1"],
        capture_output=True, text=True, cwd=tmp_path, timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    table = done.stdout.split("\n\n")[-2].splitlines()
    assert [line.split()[:2] for line in table[1:]] == [["sigkill", "1"], ["ctrl-c", "1"], ["mongod", "1"]]
    assert all(line.rstrip().endswith("ok") for line in table[1:]), done.stdout
    assert "load average" in done.stdout
