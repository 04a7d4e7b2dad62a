"""Station files: every key checked, unknown keys refused, paths relative to the file."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from sequencer.config import ConfigError, StationConfig, load_station_config


def test_full_station_file(tmp_path: Path) -> None:
    f = tmp_path / "station.toml"
    f.write_text(
        'station = "line1-st3"\noperator = "aoife"\nbatch = "B47"\nstore = "data/store.sqlite"\n'
        'ports = ["/dev/ttyUSB0", "/dev/ttyUSB1"]\n[resources.dmm]\ncapacity = 2\ninstrument = "scpi-dmm"\nport = "sim"\n'
    )
    c = load_station_config(f)
    assert c.station == "line1-st3" and c.operator == "aoife" and c.batch_or_default == "B47"
    assert c.store == tmp_path / "data" / "store.sqlite"
    assert c.ports == ("/dev/ttyUSB0", "/dev/ttyUSB1")
    assert c.resources["dmm"].capacity == 2
    c.check()
    sim = c.with_overrides(sim=4)
    assert sim.sim == 4 and sim.ports == ()


def test_reports_go_beside_the_store_unless_given(tmp_path: Path) -> None:
    f = tmp_path / "station.toml"
    f.write_text('store = "data/store.sqlite"\nsim = 1\n')
    c = load_station_config(f)
    assert c.reports_dir == tmp_path / "data" / "reports"
    # --store moves them along; --reports (or `reports` in the file) says otherwise
    assert c.with_overrides(store=tmp_path / "usb" / "s.sqlite").reports_dir == tmp_path / "usb" / "reports"
    assert c.with_overrides(reports=tmp_path / "r").reports_dir == tmp_path / "r"
    f.write_text('store = "data/store.sqlite"\nreports = "html"\nsim = 1\n')
    assert load_station_config(f).with_overrides(store=tmp_path / "x.sqlite").reports_dir == tmp_path / "html"
    assert StationConfig().reports_dir == StationConfig().store.parent / "reports"  # the data directory


@pytest.mark.parametrize(
    "text, message",
    [
        ('prots = ["/dev/ttyUSB0"]\n', "unknown key 'prots'"),
        ("sim = 'eight'\n", "sim must be a whole number"),
        ("sim = true\n", "sim must be a whole number"),
        ("rounds = 2.5\n", "rounds must be a whole number"),
        ("ask_operator = 'yes'\n", "ask_operator must be true or false"),
        ("[resources.dmm]\ncapacity = 0\n", r"resources.dmm.capacity must be a whole number >= 1"),
        ("[resources.dmm]\nspeed = 1\n", r"resources.dmm: unknown key 'speed'"),
        ("station = \n", "bad TOML"),
    ],
)
def test_bad_station_files(tmp_path: Path, text: str, message: str) -> None:
    f = tmp_path / "station.toml"
    f.write_text(text)
    with pytest.raises(ConfigError, match=message) as info:
        load_station_config(f)
    assert str(f) in str(info.value)


def test_station_needs_ports_or_sim() -> None:
    with pytest.raises(ConfigError, match="no DUT ports"):
        StationConfig().check()
    with pytest.raises(ConfigError, match=r"rounds must be >= 0 \(0: until the operator types stop\), got -1"):
        StationConfig(ports=("/dev/a",), rounds=-1).check()
    with pytest.raises(ConfigError, match="the simulated operator never does: give simulated stations a number"):
        StationConfig(sim=1, rounds=0).check()
    StationConfig(ports=("/dev/a",), rounds=0).check()  # a real station: until the operator types stop
    with pytest.raises(ConfigError, match="listed twice"):
        StationConfig(ports=("/dev/a", "/dev/a")).check()


def test_documented_example_station_file_loads() -> None:
    example = Path(__file__).resolve().parent.parent / "docs" / "examples" / "station.toml"
    c = load_station_config(example)
    c.check()
    assert c.station == "shannon-line1-st3" and len(c.ports) == 4
    assert c.store == example.parent / "data" / "store.sqlite"
    assert c.resources["dmm"].capacity == 1
    assert c.modems["/dev/ttyUSB3"] == "/dev/ttyACM3"
    assert c.provisioning_url == "https://provisioning.factory.example"
    assert c.secrets_file == Path("/etc/sequencer/secrets.toml")
    assert c.resources["printer"].instrument == "zpl-printer"
    assert c.product is not None and c.product.resolve() == example.parents[2] / "products" / "esp32_sensor.py"


@pytest.mark.parametrize(
    "body, message",
    [
        ('[modems]\n"/dev/ttyUSB0" = 3\n', "modems.'/dev/ttyUSB0' must be the modem's device path"),
        ('[modems]\n"/dev/a" = "/dev/m"\n"/dev/b" = "/dev/m"\n', "two DUT ports share one modem port"),
        ('[provisioning]\nurl = "http://x"\nuser = "me"\n', "provisioning: unknown key 'user'"),
        ('[secrets]\npath = "s.toml"\n', "secrets: unknown key 'path'"),
        ('[quality]\ncpk_threshold = 0\n', "quality: cpk_threshold must be a positive number, got 0"),
        ('[quality]\ncpk_threshold = "high"\n', "quality.cpk_threshold must be a whole number or a number"),
        ('[quality]\ncpk = 1.67\n', "quality: unknown key 'cpk'"),
    ],
)
def test_service_tables_are_checked(tmp_path: Path, body: str, message: str) -> None:
    f = tmp_path / "station.toml"
    f.write_text('sim = 2\n' + body)
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_station_config(f)


def test_a_station_that_lacks_what_the_product_needs_says_so_before_testing(tmp_path: Path) -> None:
    from fixtures.station import STATION_FIXTURES, station_services
    from sequencer.product import load_product

    tracker = load_product(Path(__file__).resolve().parent.parent / "products" / "lte_tracker.py",
                           station_fixtures=STATION_FIXTURES)
    f = tmp_path / "station.toml"
    f.write_text('ports = ["/dev/ttyUSB0", "/dev/ttyUSB1"]\n[modems]\n"/dev/ttyUSB0" = "/dev/ttyACM0"\n'
                 '[provisioning]\nurl = "http://127.0.0.1:1"\n')
    config = load_station_config(f)
    with pytest.raises(ConfigError, match=re.escape("[modems] has none for DUT port /dev/ttyUSB1")):
        station_services(config, tracker, config.ports)
    f.write_text('ports = ["/dev/ttyUSB0"]\n[modems]\n"/dev/ttyUSB0" = "/dev/ttyACM0"\n')
    config = load_station_config(f)
    with pytest.raises(ConfigError, match=re.escape("set [provisioning] url in the station file")):
        station_services(config, tracker, config.ports)


def test_the_cpk_threshold_is_set_in_the_station_file(tmp_path: Path) -> None:
    from reports.quality.statistics import DEFAULT_CPK_THRESHOLD

    f = tmp_path / "station.toml"
    f.write_text("sim = 2\n")
    assert load_station_config(f).quality.cpk_threshold == DEFAULT_CPK_THRESHOLD == 1.33
    f.write_text("sim = 2\n[quality]\ncpk_threshold = 1.67\n")
    assert load_station_config(f).quality.cpk_threshold == 1.67
