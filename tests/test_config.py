"""Station files: every key checked, unknown keys refused, paths relative to the file."""

from __future__ import annotations

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


@pytest.mark.parametrize(
    "text, message",
    [
        ('prots = ["/dev/ttyUSB0"]\n', "unknown key 'prots'"),
        ("sim = 'eight'\n", "sim must be a whole number"),
        ("sim = true\n", "sim must be a whole number"),
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
    with pytest.raises(ConfigError, match="listed twice"):
        StationConfig(ports=("/dev/a", "/dev/a")).check()


def test_documented_example_station_file_loads() -> None:
    example = Path(__file__).resolve().parent.parent / "docs" / "examples" / "station.toml"
    c = load_station_config(example)
    c.check()
    assert c.station == "shannon-line1-st3" and len(c.ports) == 4
    assert c.store == example.parent / "data" / "store.sqlite"
    assert c.resources["dmm"].capacity == 1
