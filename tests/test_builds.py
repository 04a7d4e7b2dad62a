"""Firmware builds the station finds itself: CI uploads to the portal's registry, a station downloads, checks, caches.

Against a real mongod and the portal served by hypercorn on loopback
(``tests/portal_support.py``); the station is the real ``sequencer run``
under ``--sim``, flashing simulated ESP32 boards with what it downloaded.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import sys
from pathlib import Path

import pytest
import trio

from fixtures.builds import BuildError, build_manifest, find_build, image_set_digest, move_channel, upload_build
from fixtures.images import load_image_set
from reports.storage.store import LocalStore
from sequencer.records import Outcome
from tests.mongo_support import database
from tests.portal_support import Portal
from web.auth import Role
from web.builds.model import BuildRef, Manifest, ManifestError
from web.builds.registry import BUCKET

ROOT = Path(__file__).resolve().parent.parent
BUILD = ROOT / "products" / "data" / "esp32_sensor" / "build"
PRODUCT = ROOT / "products" / "esp32_sensor.py"
APP = "esp32-sensor-testfw.bin"
STABLE = BuildRef("esp32-sensor", "stable")


def other_build(tmp_path: Path) -> Path:
    """The same images with another flasher_args.json: a build with another digest that still flashes and boots."""
    folder = tmp_path / "build-next"
    shutil.copytree(BUILD, folder)
    args = json.loads((folder / "flasher_args.json").read_text())
    (folder / "flasher_args.json").write_text(json.dumps(args, separators=(",", ":")))
    return folder


def closed_port_url() -> str:
    """A loopback URL nothing listens on: the portal out of reach."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


async def token(portal: Portal, role: str) -> str:
    return await trio.to_thread.run_sync(portal.auth.add_token, f"ci-{role}", Role.parse(role))


async def upload(portal: Portal, folder: Path, tag: str, *, token_: str, channel: str | None = "stable") -> dict:
    manifest, files = build_manifest(folder, "esp32-sensor", tag)
    return await trio.to_thread.run_sync(lambda: upload_build(portal.url, token_, manifest, files, channel=channel))


# -- the registry ---------------------------------------------------------------------------------


async def test_an_upload_stores_every_file_with_its_sha256_and_a_channel_points_at_it(portal: Portal) -> None:
    ci = await token(portal, "quality")
    answer = await upload(portal, BUILD, "v1.2.3", token_=ci)
    manifest, _ = build_manifest(BUILD, "esp32-sensor", "v1.2.3")
    assert answer["new"] is True and answer["digest"] == manifest.digest and answer["channel"] == "stable"
    assert {f["path"] for f in answer["files"]} == {"flasher_args.json", "bootloader/bootloader.bin",
                                                    "partition_table/partition-table.bin", APP}
    viewer = await token(portal, "viewer")
    async with portal.client(headers={"Authorization": f"Bearer {viewer}"}) as http:
        r = await http.get("/api/v1/builds/esp32-sensor/channels/stable")
        assert r.status_code == 200 and r.json()["tag"] == "v1.2.3"
        assert Manifest.from_json(r.json()).digest == manifest.digest
        r = await http.get(f"/api/v1/builds/esp32-sensor/v1.2.3/files/{APP}")
        assert r.status_code == 200 and r.content == (BUILD / APP).read_bytes()
        assert (await http.get("/api/v1/builds/esp32-sensor/v9/files/x.bin")).status_code == 404
        assert (await http.get("/api/v1/builds/esp32-sensor/channels/beta")).status_code == 404
    # GridFS holds each file once, tagged with its build.
    db = database(portal.settings)
    try:
        stored = sorted(d["metadata"]["path"] for d in db[f"{BUCKET}.files"].find())
    finally:
        db.client.close()
    assert stored == sorted(f["path"] for f in answer["files"])


async def test_a_tag_is_never_rewritten_but_the_same_upload_again_is_harmless(portal: Portal, tmp_path: Path) -> None:
    ci = await token(portal, "quality")
    await upload(portal, BUILD, "v1.2.3", token_=ci)
    again = await upload(portal, BUILD, "v1.2.3", token_=ci)
    assert again["new"] is False
    with pytest.raises(BuildError, match=r"409: esp32-sensor@v1\.2\.3 exists with other files"):
        await upload(portal, other_build(tmp_path), "v1.2.3", token_=ci)


async def test_a_channel_moves_to_another_tag_and_only_to_one_that_exists(portal: Portal, tmp_path: Path) -> None:
    ci = await token(portal, "quality")
    await upload(portal, BUILD, "v1.2.3", token_=ci)
    await upload(portal, other_build(tmp_path), "v1.2.4", token_=ci, channel=None)
    moved = await trio.to_thread.run_sync(lambda: move_channel(portal.url, ci, "esp32-sensor", "stable", "v1.2.4"))
    assert moved["tag"] == "v1.2.4" and moved["moved_by"] == "ci-quality"
    with pytest.raises(BuildError, match="404: no build esp32-sensor@v9: upload it first"):
        await trio.to_thread.run_sync(lambda: move_channel(portal.url, ci, "esp32-sensor", "stable", "v9"))
    build = await find_build(STABLE, portal.url, ci, tmp_path / "cache")
    assert build.label == "esp32-sensor@v1.2.4" and build.source == "portal"
    await trio.to_thread.run_sync(lambda: move_channel(portal.url, ci, "esp32-sensor", "stable", "v1.2.3"))
    back = await find_build(STABLE, portal.url, ci, tmp_path / "cache")
    assert back.label == "esp32-sensor@v1.2.3"
    # The cache keeps what its channels point at, not every build the station ever had.
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == [
        "channels", f"esp32-sensor@v1.2.3-{back.manifest.digest[:16]}"]


async def test_uploads_need_a_quality_token_and_wrong_or_bad_input_is_refused(portal: Portal, tmp_path: Path) -> None:
    manifest, files = build_manifest(BUILD, "esp32-sensor", "v1")
    viewer = await token(portal, "viewer")
    for who, status in (("sqp_not-a-token", 401), (viewer, 403)):
        with pytest.raises(BuildError, match=f"answered {status}"):
            await trio.to_thread.run_sync(lambda: upload_build(portal.url, who, manifest, files))
    ci = await token(portal, "quality")
    # Bytes that are not the manifest's: refused, nothing kept.
    liar = tmp_path / "liar.bin"
    liar.write_bytes(b"\xe9" + b"\0" * 100)
    with pytest.raises(BuildError, match=r"400: esp32-sensor@v1: esp32-sensor-testfw\.bin: the bytes sent .* are "
                                         "not the manifest's"):
        await trio.to_thread.run_sync(lambda: upload_build(portal.url, ci, manifest, {**files, APP: liar}))
    async with portal.client(headers={"Authorization": f"Bearer {ci}"}) as http:
        r = await http.post("/api/v1/builds", data={"manifest": json.dumps({**manifest.to_json(), "tag": "../x"})},
                            files=[("flasher_args.json", b"{}")])
        assert r.status_code == 400 and "tag '../x'" in r.json()["error"]
        r = await http.post("/api/v1/builds", json={"manifest": "x"})
        assert r.status_code == 415
    db = database(portal.settings)
    try:
        assert db["builds"].count_documents({}) == 0 and db[f"{BUCKET}.files"].count_documents({}) == 0
    finally:
        db.client.close()


def test_a_manifest_whose_digest_or_paths_are_wrong_is_refused() -> None:
    manifest, _ = build_manifest(BUILD, "esp32-sensor", "v1")
    data = manifest.to_json()
    assert Manifest.from_json(data) == manifest
    with pytest.raises(ManifestError, match="its digest is not its files'"):
        Manifest.from_json({**data, "digest": "0" * 64})
    for path in ("../etc/passwd", "/abs.bin", "a//b.bin", ".hidden"):
        with pytest.raises(ManifestError, match="file path"):
            Manifest.from_json({**data, "files": [*data["files"], {"path": path, "size": 1, "sha256": "0" * 64}]})
    with pytest.raises(ManifestError, match="PRODUCT@CHANNEL"):
        BuildRef.parse("esp32-sensor")


def test_the_upload_command_refuses_bad_input_in_one_line(tmp_path: Path) -> None:
    import subprocess

    def run(*argv: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "sequencer.cli", "builds", *argv], capture_output=True, text=True,
                              cwd=ROOT, env={**os.environ, **(env or {})})

    token_env = {"SEQUENCER_PORTAL_TOKEN": "sqp_x"}
    cases = [
        (["upload", str(BUILD), "--product", "esp32-sensor", "--tag", "v1", "--portal", "http://127.0.0.1:1"], {},
         "set $SEQUENCER_PORTAL_TOKEN"),
        (["upload", str(tmp_path / "nope"), "--product", "esp32-sensor", "--tag", "v1", "--portal",
          "http://127.0.0.1:1"], token_env, "not a folder"),
        (["upload", str(tmp_path), "--product", "esp32-sensor", "--tag", "v1", "--portal", "http://127.0.0.1:1"],
         token_env, "flasher_args.json: no such file"),
        (["upload", str(BUILD), "--product", "esp32-sensor", "--tag", "v 1", "--portal", "http://127.0.0.1:1"],
         token_env, "--tag 'v 1'"),
        (["upload", str(BUILD), "--product", "esp32-sensor", "--tag", "v1", "--portal", closed_port_url()],
         token_env, "cannot be reached"),
    ]
    for argv, env, message in cases:
        done = run(*argv, env=env)
        assert done.returncode == 2, (argv, done.stderr)
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and message in lines[0], (argv, done.stderr)
        assert "sqp_x" not in done.stderr


# -- the station's side ---------------------------------------------------------------------------


async def test_a_station_downloads_checks_caches_and_flashes_offline_from_the_cache(portal: Portal,
                                                                                    tmp_path: Path) -> None:
    ci = await token(portal, "quality")
    await upload(portal, BUILD, "v1.2.3", token_=ci)
    station = await token(portal, "viewer")
    cache = tmp_path / "cache"
    online = await find_build(STABLE, portal.url, station, cache)
    assert online.source == "portal" and online.label == "esp32-sensor@v1.2.3"
    assert online.images.app is not None and online.images.app.sha256 == load_image_set(
        BUILD / "flasher_args.json").app.sha256
    assert all(str(i.path).startswith(str(cache)) for i in online.images.images)
    # The digest a product's own copy of the same files has is the registry's: one build, one name.
    assert online.manifest.digest == image_set_digest(load_image_set(BUILD / "flasher_args.json"))
    offline = await find_build(STABLE, closed_port_url(), station, cache)
    assert offline.source == "cache" and offline.manifest == online.manifest
    with pytest.raises(BuildError, match=r"no build of it is cached"):
        await find_build(BuildRef("esp32-sensor", "beta"), closed_port_url(), station, cache)


async def test_a_wrong_token_is_refused_and_never_taken_for_an_outage(portal: Portal, tmp_path: Path) -> None:
    ci = await token(portal, "quality")
    await upload(portal, BUILD, "v1.2.3", token_=ci)
    cache = tmp_path / "cache"
    await find_build(STABLE, portal.url, await token(portal, "viewer"), cache)  # a cached build exists
    with pytest.raises(BuildError) as refused:
        await find_build(STABLE, portal.url, "sqp_wrong-token", cache)
    assert "refused the station's API token (401" in str(refused.value) and "sqp_wrong" not in str(refused.value)


async def test_a_file_the_portal_serves_altered_is_refused_naming_it(portal: Portal, tmp_path: Path) -> None:
    ci = await token(portal, "quality")
    await upload(portal, BUILD, "v1.2.3", token_=ci)
    db = database(portal.settings)
    try:  # someone with access to the database changes the app's bytes
        app = db[f"{BUCKET}.files"].find_one({"metadata.path": APP})
        chunk = db[f"{BUCKET}.chunks"].find_one({"files_id": app["_id"], "n": 0})
        data = bytearray(chunk["data"])
        data[100] ^= 0xFF
        db[f"{BUCKET}.chunks"].update_one({"_id": chunk["_id"]}, {"$set": {"data": bytes(data)}})
    finally:
        db.client.close()
    with pytest.raises(BuildError, match=rf"build esp32-sensor@v1\.2\.3: {APP} \(as downloaded\) does not match the "
                                         "registry's manifest .*refused, nothing flashed"):
        await find_build(STABLE, portal.url, await token(portal, "viewer"), tmp_path / "cache")
    assert not list((tmp_path / "cache").rglob(APP))  # nothing of it kept


# -- the station, end to end ---------------------------------------------------------------------


def station_file(tmp_path: Path, portal_url: str) -> Path:
    path = tmp_path / "station.toml"
    store = tmp_path / "data" / "store.sqlite"
    path.write_text(f'station = "st-builds"\nbuild = "esp32-sensor@stable"\nstore = "{store}"\n'
                    f'[portal]\nurl = "{portal_url}"\n')
    return path


async def sequencer_run(station: Path, token_: str, *extra: str) -> trio.Process:
    env = {**os.environ, "SEQUENCER_SECRET_PORTAL_TOKEN": token_, "PYTHONUNBUFFERED": "1"}
    return await trio.run_process(
        [sys.executable, "-m", "sequencer.cli", "run", str(PRODUCT), "--station", str(station), "--sim", "2",
         "--plain", *extra], capture_stdout=True, capture_stderr=True, check=False, env=env, cwd=ROOT)


def stored_runs(tmp_path: Path) -> list:
    store = LocalStore.open(tmp_path / "data" / "store.sqlite")
    try:
        return store.find_runs()
    finally:
        store.close()


@pytest.mark.slow
async def test_a_simulated_station_flashes_the_channels_build_records_it_and_flashes_offline(
        portal: Portal, tmp_path: Path) -> None:
    ci = await token(portal, "quality")
    answer = await upload(portal, BUILD, "v1.2.3", token_=ci)
    station = await token(portal, "viewer")
    done = await sequencer_run(station_file(tmp_path, portal.url), station, "--batch", "online")
    out = done.stdout.decode() + done.stderr.decode()
    assert done.returncode == 0, out
    assert "build esp32-sensor@v1.2.3 (stable" in out and station not in out
    runs = stored_runs(tmp_path)
    assert len(runs) == 2 and all(r.outcome is Outcome.PASS for r in runs)
    for run in runs:
        assert run.value("flash", "build") == "esp32-sensor@v1.2.3"
        assert run.value("flash", "build_sha256") == answer["digest"]
    log = (tmp_path / "data" / "station.log").read_text()
    assert station not in log

    # The portal out of reach: the cached build, checked again, flashed all the same.
    done = await sequencer_run(station_file(tmp_path, closed_port_url()), station, "--batch", "offline")
    out = done.stdout.decode() + done.stderr.decode()
    assert done.returncode == 0, out
    assert "from the cache: the portal is out of reach" in out
    offline = [r for r in stored_runs(tmp_path) if r.batch == "offline"]
    assert len(offline) == 2 and all(r.value("flash", "build") == "esp32-sensor@v1.2.3" for r in offline)

    # The portal shows which station flashed which build, from the runs the station shipped.
    await portal.aship(stored_runs(tmp_path))
    async with portal.logged_in("viewer") as http:
        page = await http.get("/builds")
    assert page.status_code == 200
    assert "esp32-sensor@v1.2.3" in page.text and "stable" in page.text
    assert "<td>st-builds</td>" in page.text and "<td>4</td>" in page.text

    # A cached file altered on the station's disk: refused before any board is touched, naming file and build.
    cached = next((tmp_path / "data" / "builds").rglob(APP))
    data = bytearray(cached.read_bytes())
    data[200] ^= 0x01
    cached.write_bytes(bytes(data))
    done = await sequencer_run(station_file(tmp_path, closed_port_url()), station, "--batch", "tampered")
    err = done.stderr.decode().strip().splitlines()
    assert done.returncode == 2
    assert len(err) == 1 and f"build esp32-sensor@v1.2.3: {APP} (in " in err[0] and "refused, nothing flashed" in err[0]
    assert [r for r in stored_runs(tmp_path) if r.batch == "tampered"] == []
    assert len(stored_runs(tmp_path)) == 4  # the earlier records are all still there

    # Online again, the station fetches the file anew and flashes.
    done = await sequencer_run(station_file(tmp_path, portal.url), station, "--batch", "mended")
    assert done.returncode == 0, done.stdout.decode() + done.stderr.decode()


@pytest.mark.slow
async def test_a_station_with_a_wrong_token_stops_in_one_line_and_tests_nothing(portal: Portal,
                                                                              tmp_path: Path) -> None:
    ci = await token(portal, "quality")
    await upload(portal, BUILD, "v1.2.3", token_=ci)
    done = await sequencer_run(station_file(tmp_path, portal.url), "sqp_not-the-token")
    err = done.stderr.decode().strip().splitlines()
    assert done.returncode == 2
    assert len(err) == 1 and "refused the station's API token (401" in err[0] and "not-the-token" not in err[0]
    assert stored_runs(tmp_path) == []


async def test_an_upload_over_the_forms_limit_is_accepted_only_on_the_upload_path(portal: Portal) -> None:
    ci = await token(portal, "quality")
    async with portal.client(headers={"Authorization": f"Bearer {ci}"}) as http:
        big = b"x" * (200 * 1024)
        r = await http.post("/api/v1/devices/SN-1/notes", content=big, headers={"Content-Type": "application/json"})
        assert r.status_code == 413
        r = await http.post("/api/v1/builds", data={"manifest": "{}"}, files=[("a.bin", big)])
        assert r.status_code == 400 and "files" in r.json()["error"]


def test_the_station_files_build_and_portal_url_are_checked_when_read(tmp_path: Path) -> None:
    from sequencer.config import ConfigError, load_station_config

    path = tmp_path / "station.toml"
    path.write_text('build = "esp32-sensor@stable"\n[portal]\nurl = "http://portal:8080"\nport = 8080\n')
    config = load_station_config(path)
    assert config.build == "esp32-sensor@stable" and config.portal["url"] == "http://portal:8080"
    for text, message in (('build = "esp32-sensor"\n', "build must be PRODUCT@CHANNEL"),
                          ('[portal]\nurl = 5\n', "portal.url: the portal's URL is needed")):
        path.write_text(text)
        with pytest.raises(ConfigError, match=message):
            load_station_config(path)


async def test_a_build_for_another_product_or_without_a_token_is_refused_before_any_download(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from fixtures.station import STATION_FIXTURES, station_build
    from sequencer.config import ConfigError, StationConfig
    from sequencer.product import load_product

    loaded = load_product(PRODUCT, station_fixtures=STATION_FIXTURES, station_resources=None)
    config = StationConfig(store=tmp_path / "store.sqlite", portal={"url": closed_port_url()})
    assert await station_build(loaded, config) is None  # no build named: the product's own images
    with pytest.raises(ConfigError, match="build lte-tracker@stable is for 'lte-tracker', but the station tests "
                                          "'esp32-sensor'"):
        await station_build(loaded, StationConfig(store=tmp_path / "s.sqlite", build="lte-tracker@stable"))
    monkeypatch.delenv("SEQUENCER_SECRET_PORTAL_TOKEN", raising=False)
    monkeypatch.delenv("SEQUENCER_SECRETS_FILE", raising=False)
    with pytest.raises(ConfigError, match="no API token for the portal: set SEQUENCER_SECRET_PORTAL_TOKEN"):
        await station_build(loaded, StationConfig(store=tmp_path / "s.sqlite", build="esp32-sensor@stable"))


async def test_a_portal_failing_part_way_through_a_download_leaves_the_station_on_its_cached_build(
        portal: Portal, tmp_path: Path) -> None:
    ci = await token(portal, "quality")
    await upload(portal, BUILD, "v1.2.3", token_=ci)
    cache = tmp_path / "cache"
    first = await find_build(STABLE, portal.url, ci, cache)
    await upload(portal, other_build(tmp_path), "v1.2.4", token_=ci)
    db = database(portal.settings)
    try:  # the new build's flasher_args.json loses its chunks: the portal fails once the answer has begun
        doc = db["builds"].find_one({"_id": "esp32-sensor@v1.2.4"})
        args = next(f for f in doc["files"] if f["path"] == "flasher_args.json")
        db[f"{BUCKET}.chunks"].delete_many({"files_id": args["file_id"]})
    finally:
        db.client.close()
    fallback = await find_build(STABLE, portal.url, ci, cache)
    assert fallback.source == "cache" and fallback.manifest == first.manifest


async def test_a_quality_user_moves_a_channel_on_the_builds_page_and_a_viewer_may_not(portal: Portal,
                                                                                      tmp_path: Path) -> None:
    from tests.portal_support import csrf_of

    ci = await token(portal, "quality")
    await upload(portal, BUILD, "v1.2.3", token_=ci)
    await upload(portal, other_build(tmp_path), "v1.2.4", token_=ci, channel=None)
    form = {"product": "esp32-sensor", "channel": "stable", "tag": "v1.2.4"}
    async with portal.logged_in("viewer") as http:
        page = await http.get("/builds")
        assert page.status_code == 200 and 'action="/builds/channels"' not in page.text
        r = await http.post("/builds/channels", data={**form, "csrf": csrf_of(page.text)})
        assert r.status_code == 403
    async with portal.logged_in("quality") as http:
        page = await http.get("/builds")
        assert 'action="/builds/channels"' in page.text
        assert (await http.post("/builds/channels", data=form)).status_code == 403  # no CSRF token
        r = await http.post("/builds/channels", data={**form, "csrf": csrf_of(page.text)})
        assert r.status_code == 303
        page = await http.get("/builds")
    channel = await trio.to_thread.run_sync(lambda: portal.data.db["build_channels"].find_one(
        {"_id": "esp32-sensor@stable"}))
    assert channel["tag"] == "v1.2.4" and channel["previous"] == "v1.2.3" and channel["moved_by"] == "quality"
    assert "<td class=\"mono\">v1.2.3</td>" in page.text  # the tag before, shown


async def test_ci_uploads_with_the_command_and_moves_a_channel_with_it(portal: Portal, tmp_path: Path) -> None:
    ci = await token(portal, "quality")
    env = {**os.environ, "SEQUENCER_PORTAL_TOKEN": ci, "SEQUENCER_PORTAL_URL": portal.url}

    async def builds(*argv: str) -> tuple[int, str]:
        done = await trio.run_process([sys.executable, "-m", "sequencer.cli", "builds", *argv], capture_stdout=True,
                                      capture_stderr=True, check=False, env=env, cwd=ROOT)
        return done.returncode, done.stdout.decode() + done.stderr.decode()

    manifest, _ = build_manifest(BUILD, "esp32-sensor", "v1.2.3")
    code, out = await builds("upload", str(BUILD), "--product", "esp32-sensor", "--tag", "v1.2.3", "--channel", "beta")
    assert code == 0, out
    assert f"esp32-sensor@v1.2.3 uploaded: 4 files, {manifest.size} bytes, digest {manifest.digest}" in out
    assert "esp32-sensor@beta now points at v1.2.3" in out and ci not in out
    code, out = await builds("channel", "esp32-sensor", "stable", "v1.2.3")
    assert code == 0 and "esp32-sensor@stable now points at v1.2.3" in out
    code, out = await builds("channel", "esp32-sensor", "stable", "v9")
    assert code == 2 and out.strip() == ("sequencer: error: moving esp32-sensor@stable to v9: the portal answered "
                                         "404: no build esp32-sensor@v9: upload it first")
    build = await find_build(STABLE, portal.url, ci, tmp_path / "cache")
    assert build.label == "esp32-sensor@v1.2.3" and build.manifest.digest == manifest.digest
