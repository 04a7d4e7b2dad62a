"""Per-device NVS configuration: layers, secrets, the NVS image, and the phase on simulated ESP32 boards."""

from __future__ import annotations

import copy
import hashlib
import io
import json
import logging
import pickle
import shutil
import struct
import traceback
import zlib
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import attrs
import cattrs
import pytest
import structlog
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fixtures.device_config import (
    ConfigError,
    ConfigValue,
    DeviceConfigMissing,
    DeviceConfigStore,
    LayeredConfig,
    Secret,
    SecretMissing,
    SecretSource,
    device_config_store,
)
from fixtures.nvs import (
    INT_TYPES,
    NVS_KEYS,
    NvsBuildError,
    NvsEntry,
    NvsError,
    NvsFormatError,
    build_nvs_image,
    find_partition,
    load_partition_table,
    new_xts_key,
    nvs_keys_image,
    read_nvs_image,
    read_nvs_keys_image,
    verify_nvs_image,
)
from fixtures.dut import test_firmware
from fixtures.partition_table import APP, DATA, DEVICE_KEYS, FACTORY, NVS, Partition, PartitionTable, single_app_table
from fixtures.sim.esp32_board import open_esp32_farm
from fixtures.station import STATION_FIXTURES, station_fixtures
from phases import esp32
from phases.nvs_config import NvsEncryption, nvs_config
from reports.storage.store import LocalStore
from sequencer import Measurement, Product, phase
from sequencer.config import StationConfig
from sequencer.engine import RunSettings
from sequencer.events import EventBus
from sequencer.product import LoadedProduct, validate_product
from sequencer.records import MeasurementOutcome, MeasurementRecord, Outcome, RunRecord, run_to_json, to_dict
from sequencer.station import run_station

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "products" / "data" / "lte_tracker" / "config"
BUILD = ROOT / "products" / "data" / "esp32_sensor" / "build"
FLASHER_ARGS = BUILD / "flasher_args.json"

#: distinctive values, so that finding one anywhere is a finding
CA_TOKEN = "ca-token-7f3a9c1e5b2d4f60"
API_TOKEN = "api-token-0d9e8c7b6a5f4e3d"


def secrets_for_example(tmp_path: Path) -> SecretSource:
    """The example layers' secrets: one from a secrets file, one from the environment."""
    file = tmp_path / "secrets.toml"
    file.write_text(f'mqtt_ca_token = "{CA_TOKEN}"\n')
    return SecretSource.from_env({"SEQUENCER_SECRET_TRACKER_API_TOKEN": API_TOKEN}, file=file)


# ----------------------------------------------------------- the NVS image


def page_entry(image: bytes, page: int, index: int) -> bytes:
    start = page * 4096 + 64 + index * 32
    return image[start : start + 32]


def test_the_image_reads_back_key_by_key_in_every_type() -> None:
    entries = [
        *(NvsEntry("ints", f"{t}_lo", t, lo) for t, lo in
          (("u8", 0), ("i8", -128), ("u16", 0), ("i16", -32768), ("u32", 0), ("i32", -2**31), ("u64", 0),
           ("i64", -2**63))),
        *(NvsEntry("ints", f"{t}_hi", t, 2 ** int(t[1:]) - 1 if t[0] == "u" else 2 ** (int(t[1:]) - 1) - 1)
          for t in INT_TYPES),
        NvsEntry("mqtt", "broker", "string", "mqtts://mqtt.example.com:8883"),
        NvsEntry("mqtt", "empty", "string", ""),
        NvsEntry("mqtt", "utf8", "string", "Zürich ✓"),
        NvsEntry("mqtt", "long", "string", "x" * 3967),  # the longest the generator writes: 124 entries
        NvsEntry("certs", "small", "blob", b"\x00\x01\xff"),
        NvsEntry("certs", "ca", "blob", bytes(range(256)) * 40),  # 10 KiB: chunks on three pages
    ]
    image = build_nvs_image(entries, 0x6000)
    assert len(image) == 0x6000
    assert read_nvs_image(image) == entries
    assert verify_nvs_image(image, entries) == []

    # Checked against the format itself, not only against our own reader:
    # page 0 is active, version 2, header CRC over bytes 4..28.
    state, sequence, version = struct.unpack_from("<IIB", image)
    assert (state, sequence, version) == (0xFFFFFFFC, 0, 0xFE)  # full: later pages took the rest
    assert struct.unpack_from("<I", image, 28)[0] == zlib.crc32(image[4:28], 0xFFFFFFFF) & 0xFFFFFFFF
    # entry 0 defines namespace 1: namespace index 0, type u8, span 1, key "ints", value 1
    first = page_entry(image, 0, 0)
    assert first[0:3] == b"\x00\x01\x01" and first[8:24].rstrip(b"\0") == b"ints" and first[24] == 1
    # the broker string: type SZ (0x21), span 1 + ceil(30/32) data entries, size with NUL, data CRC
    broker_index = 1 + 2 * len(INT_TYPES) + 1  # ints namespace + 16 ints, then the mqtt namespace
    broker = page_entry(image, 0, broker_index)
    assert broker[1] == 0x21 and broker[2] == 2 and broker[8:24].rstrip(b"\0") == b"broker"
    text = b"mqtts://mqtt.example.com:8883\0"
    assert struct.unpack_from("<HxxI", broker, 24) == (len(text), zlib.crc32(text, 0xFFFFFFFF) & 0xFFFFFFFF)
    assert page_entry(image, 0, broker_index + 1)[: len(text)] == text


def test_a_blob_spans_pages_as_chunks_and_an_index() -> None:
    blob = bytes(range(256)) * 40
    image = build_nvs_image([NvsEntry("certs", "ca", "blob", blob)], 0x6000)
    kinds = []
    for page in range(6):
        for index in range(126):
            raw = page_entry(image, page, index)
            if raw[1] in (0x42, 0x48) and raw[8:24].rstrip(b"\0") == b"ca":
                kinds.append((page, raw[1], raw[3]))
    # BLOB_DATA chunks 0, 1, 2 on pages 0, 1, 2, then the BLOB_IDX
    assert [(p, k, c) for p, k, c in kinds if k == 0x42] == [(0, 0x42, 0), (1, 0x42, 1), (2, 0x42, 2)]
    assert [k for _, k, _ in kinds].count(0x48) == 1


def test_a_corrupted_image_is_refused_naming_the_entry() -> None:
    image = bytearray(build_nvs_image([NvsEntry("mqtt", "broker", "string", "mqtts://a")], 0x3000))
    image[64 + 32 + 32 + 3] ^= 0x01  # a byte of the string's data
    with pytest.raises(NvsFormatError, match=r"page 0 entry 1 \('broker'\): data CRC mismatch"):
        read_nvs_image(bytes(image))


def test_what_cannot_be_built_is_refused_without_quoting_the_value() -> None:
    with pytest.raises(NvsBuildError, match=r"^mqtt.port: out of range for u16 \(0..65535\)$"):
        build_nvs_image([NvsEntry("mqtt", "port", "u16", 70000)], 0x3000)
    with pytest.raises(NvsBuildError, match="key 'a_key_that_is_too_long' must be 1 to 15"):
        build_nvs_image([NvsEntry("mqtt", "a_key_that_is_too_long", "string", "x")], 0x3000)
    with pytest.raises(NvsBuildError, match="do not fit in an NVS partition of 0x3000 bytes"):
        build_nvs_image([NvsEntry("big", f"k{i}", "string", "y" * 3000) for i in range(4)], 0x3000)
    with pytest.raises(NvsBuildError, match="mqtt.a: given twice"):
        build_nvs_image([NvsEntry("mqtt", "a", "u8", 1), NvsEntry("mqtt", "a", "u8", 2)], 0x3000)
    assert "70000" not in repr(NvsEntry("mqtt", "port", "u16", 70000))


names = st.text(st.sampled_from("abcdefghijklmnopqrstuvwxyz_0123456789"), min_size=1, max_size=15)


@st.composite
def nvs_entries(draw: Any) -> list[NvsEntry]:
    keys = draw(st.lists(st.tuples(st.sampled_from(["app", "mqtt", "sys"]), names), min_size=1, max_size=20,
                         unique=True))
    entries = []
    for namespace, key in sorted(keys, key=lambda k: ["app", "mqtt", "sys"].index(k[0])):
        kind = draw(st.sampled_from([*INT_TYPES, "string", "blob"]))
        if kind in INT_TYPES:
            bits = int(kind[1:])
            low, high = (0, 2**bits - 1) if kind[0] == "u" else (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
            value: Any = draw(st.integers(low, high))
        elif kind == "string":
            value = draw(st.text(st.characters(blacklist_characters="\0", blacklist_categories=("Cs",)), max_size=300))
        else:
            value = draw(st.binary(max_size=5000))
        entries.append(NvsEntry(namespace, key, kind, value))
    return entries


@settings(max_examples=60, deadline=None)
@given(entries=nvs_entries(), encrypted=st.booleans())
def test_any_entries_read_back_as_built(entries: list[NvsEntry], encrypted: bool) -> None:
    key = new_xts_key() if encrypted else None
    try:
        image = build_nvs_image(entries, 0x10000, key=key)
    except NvsBuildError as exc:
        assert "do not fit" in str(exc)
        return
    assert read_nvs_image(image, key=key) == entries


# ---------------------------------------------------------------- encryption


def test_an_encrypted_image_differs_has_the_partition_size_and_decrypts_with_its_key(tmp_path: Path) -> None:
    from esp_idf_nvs_partition_gen import nvs_partition_gen as gen

    entries = [NvsEntry("mqtt", "password", "string", "hunter2-but-longer-than-one-entry"),
               NvsEntry("certs", "ca", "blob", bytes(range(256)) * 20)]
    key = new_xts_key()
    plain = build_nvs_image(entries, 0x6000)
    secret = build_nvs_image(entries, 0x6000, key=key)
    assert len(secret) == len(plain) == 0x6000
    assert secret != plain
    assert b"hunter2" not in secret
    # Page headers and bitmaps stay plain; the entries do not.
    assert secret[:64] == plain[:64] and secret[64:96] != plain[64:96]
    assert read_nvs_image(secret, key=key) == entries
    with pytest.raises(NvsFormatError, match="CRC mismatch"):
        read_nvs_image(secret, key=new_xts_key())
    # The generator's own decrypt (its key file is our nvs_keys image) gives back the plain image.
    (tmp_path / "enc.bin").write_bytes(secret)
    (tmp_path / "keys.bin").write_bytes(nvs_keys_image(key))
    gen.decrypt(SimpleNamespace(input=str(tmp_path / "enc.bin"), key=str(tmp_path / "keys.bin"),
                                output="dec.bin", outdir=str(tmp_path)))
    assert (tmp_path / "dec.bin").read_bytes() == plain


def test_the_key_partition_holds_the_key_and_its_crc() -> None:
    key = new_xts_key()
    image = nvs_keys_image(key)
    assert len(image) == 4096 and image[:64] == key and image[68:] == b"\xff" * (4096 - 68)
    assert read_nvs_keys_image(image) == key
    with pytest.raises(NvsFormatError, match="key CRC mismatch"):
        read_nvs_keys_image(bytes([image[0] ^ 1]) + image[1:])
    assert new_xts_key() != key
    with pytest.raises(NvsBuildError, match="64 bytes"):
        build_nvs_image([], 0x3000, key=b"short")


# ----------------------------------------------------------- partition table


def test_the_shipped_build_has_an_nvs_partition_found_by_type_and_subtype() -> None:
    table = load_partition_table(FLASHER_ARGS)
    assert table == load_partition_table(BUILD / "partition_table" / "partition-table.bin")
    nvs = find_partition(table)
    assert (nvs.label, nvs.offset, nvs.size) == ("nvs", 0x9000, 0x6000)
    assert find_partition(table, label="nvs") == nvs
    assert find_partition(table, label="other") is None
    assert find_partition(table, subtype=NVS_KEYS) is None
    assert find_partition(single_app_table()) == nvs
    with pytest.raises(NvsError, match="no such partition table"):
        load_partition_table(BUILD / "missing.bin")


# ------------------------------------------------------------------- layers


def test_the_example_layers_load_and_merge_for_an_acme_unit(tmp_path: Path) -> None:
    config = LayeredConfig.load(CONFIG)
    assert sorted(g.name for g in config.groups) == ["acme", "globex"]
    assert set(config.secret_names) == {"mqtt_ca_token", "tracker_api_token", "globex_api_token"}
    device = config.resolve({"serial": "SN000000042", "apn": "m2m.op"}, batch="ACME-7",
                            secrets=secrets_for_example(tmp_path))
    assert device.group == "acme"
    got = {v.name: (v.value, v.layer) for v in device.values}
    assert got["mqtt.broker"] == ("mqtts://mqtt.acme.example.net:8883", "group:acme")
    assert got["mqtt.keepalive_s"] == (60, "cluster")
    assert got["mqtt.qos"] == (1, "class")
    assert got["gnss.fix_interval_s"] == (60, "group:acme")
    assert got["gnss.constellations"] == (b"\x0f", "class")
    assert got["mqtt.client_id"] == ("trk-SN000000042", "device")
    assert got["mqtt.username"] == ("SN000000042", "device")
    assert got["modem.apn"] == ("m2m.op", "device")
    assert device.get("mqtt.ca_token".split(".")[0], "ca_token").value.reveal() == CA_TOKEN
    assert device.get("cloud", "api_token").value.reveal() == API_TOKEN
    assert sorted(device.secret_keys) == ["cloud.api_token", "mqtt.ca_token", "mqtt.password"]
    creds = device.credentials
    assert creds is not None and (creds.client_id, creds.username) == ("trk-SN000000042", "SN000000042")
    assert len(creds.password.reveal()) == 24
    # Without the APN from a cellular phase, the cluster's default stays.
    other = config.resolve({"serial": "SN1"}, batch="X", secrets=secrets_for_example(tmp_path))
    assert other.group is None and other.get("modem", "apn").value == "iot.default"
    assert other.get("modem", "apn").layer == "cluster"
    assert other.credentials.password != creds.password


LAYERS = ["cluster", "class", "group"]


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    layers=st.lists(
        st.dictionaries(st.sampled_from(["a", "b", "c", "d", "e"]), st.integers(0, 2**32 - 1), max_size=5),
        min_size=3, max_size=3,
    ),
    in_group=st.booleans(),
)
def test_a_later_layer_wins_key_by_key(layers: list[dict[str, int]], in_group: bool) -> None:
    def layer(values: dict[str, int]) -> dict[str, Any]:
        return {"nvs": {"app": {k: {"u32": v} for k, v in values.items()}}}

    config = LayeredConfig.from_mappings(
        cluster=layer(layers[0]), product=layer(layers[1]),
        groups={"g": {"select": {"batch": "G-*"}, **layer(layers[2])}},
    )
    device = config.resolve({}, batch="G-1" if in_group else "H-1", secrets=SecretSource())
    applied = LAYERS if in_group else LAYERS[:2]
    expected: dict[str, tuple[int, str]] = {}
    for name, values in zip(applied, layers):
        for key, value in values.items():
            expected[key] = (value, name if name != "group" else "group:g")
    assert {v.key: (v.value, v.layer) for v in device.values} == expected
    assert device.group == ("g" if in_group else None)


def test_selectors_choose_the_group(tmp_path: Path) -> None:
    config = LayeredConfig.from_mappings(
        product={"nvs": {"app": {"tier": "basic"}}},
        groups={
            "acme": {"select": {"batch": "ACME-*"}, "nvs": {"app": {"tier": "acme"}}},
            "vip": {"select": {"customer": ["vip", "gold-*"], "hardware_rev": "C*"}, "nvs": {"app": {"tier": "vip"}}},
        },
    )

    def tier(identity: dict[str, str], batch: str) -> str:
        return config.resolve(identity, batch=batch, secrets=SecretSource()).get("app", "tier").value

    assert tier({}, "ACME-12") == "acme"
    assert tier({}, "acme-12") == "basic"  # globs are case-sensitive
    assert tier({"customer": "gold-3", "hardware_rev": "C2"}, "B1") == "vip"
    assert tier({"customer": "vip", "hardware_rev": "B1"}, "B1") == "basic"  # every field must match
    assert tier({"customer": "vip"}, "B1") == "basic"  # a field the DUT lacks does not match
    with pytest.raises(ConfigError, match=r"<group:acme layer> and <group:vip layer> both select this DUT"):
        tier({"customer": "vip", "hardware_rev": "C1"}, "ACME-1")
    required = attrs.evolve(config, groups_required=True)
    with pytest.raises(ConfigError, match=r"\[groups\] required = true, but no group selects this DUT \(batch='B1'"):
        required.resolve({}, batch="B1", secrets=SecretSource())


def test_a_missing_secret_is_one_line_naming_the_secret_and_the_layer_file(tmp_path: Path) -> None:
    config = LayeredConfig.load(CONFIG)
    with pytest.raises(SecretMissing) as caught:
        config.resolve({"serial": "SN1"}, batch="GLX-3", secrets=secrets_for_example(tmp_path))
    message = str(caught.value)
    assert "\n" not in message
    assert message == (
        f"{CONFIG / 'groups' / 'globex.toml'}: [nvs.cloud] api_token: secret 'globex_api_token' is not set "
        f"(set SEQUENCER_SECRET_GLOBEX_API_TOKEN or add 'globex_api_token' to {tmp_path / 'secrets.toml'})"
    )
    with pytest.raises(SecretMissing, match=r"cluster.toml: \[nvs.mqtt\] ca_token: secret 'mqtt_ca_token' is not set "
                                            r"\(set SEQUENCER_SECRET_MQTT_CA_TOKEN, or name a secrets file in "
                                            r"SEQUENCER_SECRETS_FILE\) \(and 1 more: tracker_api_token\)"):
        config.resolve({"serial": "SN1"}, secrets=SecretSource.from_env({}))


def test_secrets_come_from_the_environment_before_the_file(tmp_path: Path) -> None:
    file = tmp_path / "s.toml"
    file.write_text('token = "from-file"\npin = "not a number"\n')
    config = LayeredConfig.from_mappings(product={"nvs": {"app": {"token": {"secret": "token"}}}})
    source = SecretSource.from_env({"SEQUENCER_SECRETS_FILE": str(file)})
    assert source.file == file
    assert config.resolve({}, secrets=source).get("app", "token").value.reveal() == "from-file"
    source = SecretSource.from_env({"SEQUENCER_SECRETS_FILE": str(file), "SEQUENCER_SECRET_TOKEN": "from-env"})
    assert config.resolve({}, secrets=source).get("app", "token").value.reveal() == "from-env"
    # A typed secret that does not parse: the error says so without the text.
    typed = LayeredConfig.from_mappings(product={"nvs": {"app": {"pin": {"secret": "pin", "type": "u16"}}}})
    with pytest.raises(ConfigError, match=r"app\] pin: secret 'pin': not a whole number$") as caught:
        typed.resolve({}, secrets=SecretSource(file))
    assert "not a number" not in str(caught.value)
    assert "not a number" not in "".join(traceback.format_exception(caught.value))
    with pytest.raises(ConfigError, match="the secrets file does not exist"):
        config.resolve({}, secrets=SecretSource(tmp_path / "nope.toml"))


def test_layer_mistakes_are_one_line_errors_naming_the_file_and_key(tmp_path: Path) -> None:
    def load(files: dict[str, str]) -> LayeredConfig:
        root = tmp_path / f"c{len(list(tmp_path.iterdir()))}"
        for name, text in files.items():
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            (root / name).write_text(text)
        return LayeredConfig.load(root)

    cases = {
        "needs its type, e.g. { u16 = 8883 }": {"class.toml": "[nvs.mqtt]\nport = 8883\n"},
        "unknown table [device] (a cluster layer has: nvs)": {"cluster.toml": "[device]\n", "class.toml": ""},
        "is u32 here but u16 in": {"cluster.toml": "[nvs.mqtt]\nport = { u16 = 1 }\n",
                                   "class.toml": "[nvs.mqtt]\nport = { u32 = 1 }\n"},
        "out of range for u8": {"class.toml": "[nvs.sys]\nlevel = { u8 = 300 }\n"},
        "needs a [select] table": {"class.toml": "", "groups/acme.toml": "[nvs.mqtt]\nbroker = 'x'\n"},
        "use plain {field} names": {"class.toml": "[device]\nclient_id = { key = 'mqtt.cid', template = '{serial.x}' }\n"},
        "bytes must be a whole number from 16": {"class.toml": "[device]\npassword = { key = 'mqtt.pw', bytes = 8 }\n"},
        "generates it as a string": {"class.toml": "[nvs.mqtt]\npw = { u8 = 1 }\n[device]\npassword = { key = 'mqtt.pw' }\n"},
        "not TOML": {"class.toml": "[nvs\n"},
        "must be 1 to 15 printable ASCII": {"class.toml": "[nvs.mqtt]\nthis_key_is_far_too_long = 'x'\n"},
        "no such file": {"cluster.toml": ""},
    }
    for expected, files in cases.items():
        with pytest.raises(ConfigError) as caught:
            load(files)
        assert expected in str(caught.value) and "\n" not in str(caught.value), (expected, str(caught.value))
        assert str(tmp_path) in str(caught.value)


def test_a_template_field_no_phase_set_is_named() -> None:
    config = LayeredConfig.from_mappings(
        product={"device": {"client_id": {"key": "mqtt.client_id", "template": "trk-{serial}"}}}
    )
    with pytest.raises(ConfigError, match=r"template 'trk-\{serial\}' needs the DUT identity 'serial', which no "
                                          r"earlier phase set \(known: chip, mac\)"):
        config.resolve({"chip": "ESP32", "mac": "AA"}, secrets=SecretSource())


# ---------------------------------------------------------------- redaction


def test_a_secret_shows_as_stars_everywhere_it_could_leak(tmp_path: Path) -> None:
    secret = Secret("s3cr3t-value")
    assert repr(secret) == str(secret) == f"{secret}" == f"{secret!r}" == f"{secret:>20}" == "%s" % secret == "***"
    assert "s3cr3t" not in repr([secret, {"k": secret}, (secret,)])
    assert secret.reveal() == "s3cr3t-value"
    assert secret == Secret("s3cr3t-value") and secret != Secret("other") and hash(secret) == hash(Secret("x"))
    assert copy.deepcopy(secret) is secret
    with pytest.raises(TypeError, match="not pickled"):
        pickle.dumps(secret)
    with pytest.raises(AttributeError):
        secret._value = "x"  # type: ignore[misc]

    # structlog's JSON lines, as the station log writes them
    out = io.StringIO()
    structlog.configure(
        processors=[structlog.processors.add_log_level, structlog.processors.JSONRenderer()],
        wrapper_class=structlog.make_filtering_bound_logger(logging.DEBUG),
        logger_factory=structlog.WriteLoggerFactory(file=out),
    )
    structlog.get_logger().info("login", password=secret, nested={"p": [secret]})
    line = json.loads(out.getvalue())
    assert line["password"] == "***" and line["nested"] == {"p": ["***"]}

    # attrs and cattrs leave it as it is: serialised it is *** or refused, never the value
    config = LayeredConfig.load(CONFIG).resolve({"serial": "SN9"}, secrets=secrets_for_example(tmp_path))
    password = config.credentials.password.reveal()
    converter = cattrs.Converter()
    for dumped in (attrs.asdict(config), converter.unstructure(config)):
        text = str(dumped)  # layers are keyed by (namespace, key): not JSON, but printable
        assert password not in text and CA_TOKEN not in text and API_TOKEN not in text and "***" in text
    for dumped in ([attrs.asdict(v) for v in config.values], [converter.unstructure(v) for v in config.values],
                   attrs.asdict(config.credentials), to_dict(config.credentials)):
        text = json.dumps(dumped, default=str)
        assert password not in text and CA_TOKEN not in text and API_TOKEN not in text and "***" in text
    assert password not in repr(config) and CA_TOKEN not in repr(config)
    record = MeasurementRecord("oops", MeasurementOutcome.PASS, value=secret)
    assert json.dumps(to_dict(record), default=str).count("***") == 1
    with pytest.raises(TypeError):
        json.dumps(to_dict(record))  # refused rather than written
    redacted = json.dumps(config.redacted())
    assert password not in redacted and CA_TOKEN not in redacted and API_TOKEN not in redacted
    entries = {(e["namespace"], e["key"]): e for e in config.redacted()["entries"]}
    assert entries[("mqtt", "password")] == {"namespace": "mqtt", "key": "password", "type": "string",
                                             "layer": "device", "secret": True}
    assert entries[("mqtt", "client_id")]["value"] == "trk-SN9"
    assert ConfigValue("a", "b", "string", Secret("x"), "cluster").secret


async def test_the_store_lives_for_one_run_and_says_when_it_is_empty() -> None:
    factory = device_config_store()
    async with factory(SimpleNamespace(index=0)) as store:  # type: ignore[arg-type]
        assert isinstance(store, DeviceConfigStore) and not store.ready
        with pytest.raises(DeviceConfigMissing, match="the nvs_config phase must pass first"):
            store.credentials  # noqa: B018
        with pytest.raises(DeviceConfigMissing, match="the nvs_config phase must pass first"):
            store.broker  # noqa: B018
        config = LayeredConfig.from_mappings(product={"nvs": {"a": {"b": "c"}}}).resolve({}, secrets=SecretSource())
        store.put(config)
        assert store.config is config and store.nvs_key is None
        with pytest.raises(DeviceConfigMissing, match="generates no broker credentials"):
            store.credentials  # noqa: B018
        assert store.broker is None
        with_login = LayeredConfig.load(CONFIG).resolve({"serial": "SN5"}, secrets=SecretSource.from_env(
            {"SEQUENCER_SECRET_MQTT_CA_TOKEN": "a", "SEQUENCER_SECRET_TRACKER_API_TOKEN": "b"}))
        store.put(with_login)
        login = store.broker
        password = with_login.credentials.password.reveal()
        assert (login.client_id, login.username, login.password) == ("trk-SN5", "SN5", password)
        assert password not in repr(login) and password not in repr(store)
    assert not store.ready


# ------------------------------------------------------- the phase, end to end


def custom_table(tmp_path: Path) -> Path:
    """The shipped layout with nvs_keys where phy_init was (encryption needs the key partition)."""
    table = PartitionTable([
        Partition("nvs", DATA, NVS, 0x9000, 0x6000),
        Partition("nvs_keys", DATA, NVS_KEYS, 0xF000, 0x1000, flags=1),
        Partition("factory", APP, FACTORY, 0x10000, 0x100000),
        Partition(DEVICE_KEYS, DATA, NVS, 0x110000, 0x3000),
    ])
    path = tmp_path / "partition-table.bin"
    path.write_bytes(table.to_bytes())
    return path


def tracker(configure: Any, flash: Any, register_seen: dict[int, str]) -> Product:
    """detect → label → nvs_config → flash (starts the app) → boot → register."""

    @phase(timeout=5)
    async def label(ctx, slot):
        """Stands in for the label scan and the cellular phase: serial and APN."""
        ctx.identify(serial=f"SN{900000000 + slot.index}", apn="tracker.m2m", customer="vip" if slot.index else "")

    @phase(measurements=[Measurement("client_id")], timeout=5)
    async def register(ctx, slot, device_config):
        """What a registration phase does with the credentials; logs them carelessly on purpose."""
        creds = device_config.credentials
        register_seen[slot.index] = creds.password.reveal()
        ctx.log.info("registering", client_id=creds.client_id, password=creds.password)
        ctx.log.info(f"posting {creds} with {creds.password}")
        ctx.measurements.client_id = creds.client_id

    detect = esp32.detect
    label_ = label.depends_on(detect)
    configure = configure.depends_on(label_)
    flash = flash.depends_on(configure)
    boot = esp32.boot.depends_on(flash)
    return Product(
        name="lte-tracker-test",
        phases=[detect, label_, configure, flash, boot, register.depends_on(boot)],
        fixtures={"device_config": device_config_store(),
                  "dut": test_firmware(wait_boot=False)},
    )


async def run_boards(product: Product, tmp_path: Path, n: int, batch: str) -> tuple[list[RunRecord], list[Any], str]:
    """Run ``product`` on ``n`` simulated boards; the runs, the boards, and the station log (JSON lines, DEBUG)."""
    validate_product(product, station_fixtures=STATION_FIXTURES)
    log_path = tmp_path / "station.log"
    with open(log_path, "a", encoding="utf-8") as handle:
        structlog.configure(
            processors=[structlog.contextvars.merge_contextvars, structlog.processors.add_log_level,
                        structlog.processors.format_exc_info, structlog.processors.JSONRenderer()],
            wrapper_class=structlog.make_filtering_bound_logger(logging.DEBUG),
            logger_factory=structlog.WriteLoggerFactory(file=handle),
            cache_logger_on_first_use=False,
        )
        store = LocalStore.open(tmp_path / "store.sqlite", station=True)
        try:
            async with store.writer(), open_esp32_farm(n, seed=3) as devices:
                result = await run_station(
                    LoadedProduct(product, Path("<test>")), [d.path for d in devices],
                    settings=RunSettings("test", batch=batch), store=store, bus=EventBus(), handle_signals=False,
                    fixtures=station_fixtures(StationConfig()),
                )
        finally:
            store.close()
    store_bytes = b"".join(p.read_bytes() for p in tmp_path.glob("store.sqlite*"))
    return sorted(result.runs, key=lambda r: r.slot), devices, log_path.read_text() + store_bytes.decode("latin-1")


def everything_recorded(run: RunRecord) -> str:
    """The run's JSON and every attachment's text."""
    attachments = [a.data.decode("utf-8", "replace") for p in run.phases for a in p.attachments]
    return run_to_json(run) + "\n".join(attachments) + "\n".join(line.message for p in run.phases for line in p.logs)


async def test_a_secret_that_is_not_utf8_text_is_named_not_quoted() -> None:
    from fixtures.nvs import check_value

    # An environment variable holding bytes that are not UTF-8 decodes to lone surrogates.
    assert check_value("string", "pw\udcff42") == "a string needs valid UTF-8 text"


def test_the_recorded_image_hash_tests_no_guess_of_a_short_secret(tmp_path: Path) -> None:
    from fixtures.partition_table import Partition
    from phases.nvs_config import _build, _summary

    layers = LayeredConfig.from_mappings(
        product={"nvs": {"modem": {"pin": {"secret": "sim_pin", "type": "u16"}, "apn": "iot.example"}}},
    )
    target = Partition("nvs", 1, 2, 0x9000, 0x6000)

    def recorded(pin: str) -> tuple[str, dict]:
        workdir = tmp_path / pin
        workdir.mkdir()
        built = _build(layers, {"serial": "SN0001"}, "", SecretSource(env={"SIM_PIN": Secret(pin)}), target, None,
                       None, workdir)
        return built.recorded_sha256, json.loads(_summary(built, target, None))

    sha_4711, summary = recorded("4711")
    sha_1234, _ = recorded("1234")
    assert sha_4711 == sha_1234  # the same record whatever the PIN: nothing to test guesses against
    assert summary["sha256"] == sha_4711 and summary["sha256_of"] == "the image with its secrets blanked"
    assert "4711" not in json.dumps(summary)


async def test_the_phase_writes_the_nvs_into_the_board_and_no_secret_anywhere_else(tmp_path: Path) -> None:
    config_dir = tmp_path / "config"
    shutil.copytree(CONFIG, config_dir)
    # A second group that also selects slot 1: its run must stop with an error naming both files.
    (config_dir / "groups" / "vip.toml").write_text("[select]\ncustomer = 'vip'\n[nvs.mqtt]\nqos = { u8 = 2 }\n")
    seen: dict[int, str] = {}
    product = tracker(
        nvs_config(config_dir, partition_table=FLASHER_ARGS, secrets=secrets_for_example(tmp_path)),
        esp32.flash_images(FLASHER_ARGS), seen,
    )
    runs, devices, station_log = await run_boards(product, tmp_path, 2, "ACME-7")

    good, ambiguous = runs
    assert good.outcome is Outcome.PASS, [(p.name, p.outcome, p.reason) for p in good.phases]
    configure = good.phase("nvs_config")
    values = {m.name: m.value for m in configure.attempts[-1].measurements}
    assert values["nvs_verdict"] == "pass" and values["nvs_group"] == "acme"
    assert (values["nvs_offset"], values["nvs_bytes"]) == (0x9000, 0x6000)

    # The board's flash at the NVS offset is the image built, and holds what the layers say.
    flash = devices[0].board.chip.flash.read(0x9000, 0x6000)
    on_board = {e.name: e.value for e in read_nvs_image(flash)}
    # Its secrets are in the clear, so the record holds the hash of it with them blanked, not its own.
    assert hashlib.sha256(flash).hexdigest() != values["nvs_sha256"]
    secret = {f"{e['namespace']}.{e['key']}" for e in json.loads(next(
        a.data for a in configure.attachments if a.name == "nvs_config.json"))["entries"] if e["secret"]}
    blanked = [attrs.evolve(e, value=(0 if isinstance(e.value, int) else type(e.value)(len(e.value)) if isinstance(
        e.value, bytes) else "0" * len(e.value))) if e.name in secret else e for e in read_nvs_image(flash)]
    assert hashlib.sha256(build_nvs_image(blanked, 0x6000)).hexdigest() == values["nvs_sha256"]
    password = seen[0]
    assert on_board["mqtt.password"] == password and len(password) == 24
    assert on_board["mqtt.client_id"] == "trk-SN900000000" and on_board["mqtt.username"] == "SN900000000"
    assert on_board["mqtt.broker"] == "mqtts://mqtt.acme.example.net:8883"
    assert on_board["mqtt.ca_token"] == CA_TOKEN and on_board["cloud.api_token"] == API_TOKEN
    assert on_board["modem.apn"] == "tracker.m2m" and on_board["gnss.fix_interval_s"] == 60
    # The app the flash phase wrote after it still boots.
    assert devices[0].board.boots == ["app"]

    summary = json.loads(next(a.data for a in configure.attachments if a.name == "nvs_config.json"))
    assert summary["partition"] == {"label": "nvs", "offset": 0x9000, "size": 0x6000}
    assert summary["group"] == "acme" and summary["encrypted"] is False
    listed = {(e["namespace"], e["key"]): e for e in summary["entries"]}
    assert listed[("mqtt", "password")]["secret"] and "value" not in listed[("mqtt", "password")]
    assert listed[("mqtt", "broker")]["layer"] == "group:acme"
    assert listed[("mqtt", "client_id")] == {"namespace": "mqtt", "key": "client_id", "type": "string",
                                             "layer": "device", "secret": False, "value": "trk-SN900000000"}

    # The careless registration phase logged *** for the password.
    assert any("password=***" in line.message for line in good.phase("register").logs)

    # Nothing secret anywhere: records (phases, logs, attachments), the station log, the store.
    assert '"nvs image built"' in station_log and '"password": "***"' in station_log  # the log was written
    for text in (everything_recorded(good), everything_recorded(ambiguous), station_log):
        for value in (password, CA_TOKEN, API_TOKEN):
            assert value not in text

    # Slot 1: two groups select it; one line naming both files, nothing written, the rest skipped.
    failed = ambiguous.phase("nvs_config")
    assert failed.outcome is Outcome.ERROR
    assert f"{config_dir / 'groups' / 'acme.toml'} and {config_dir / 'groups' / 'vip.toml'} both select this DUT" \
        in failed.reason
    assert ambiguous.phase("flash").outcome is Outcome.SKIPPED
    assert devices[1].board.chip.flash.read(0x9000, 0x6000) == b"\xff" * 0x6000


async def test_an_encrypted_nvs_and_its_key_partition_are_written_per_device(tmp_path: Path) -> None:
    table = custom_table(tmp_path)
    images = {0x1000: BUILD / "bootloader" / "bootloader.bin", 0x8000: table,
              0x10000: BUILD / "esp32-sensor-testfw.bin"}
    seen: dict[int, str] = {}
    product = tracker(
        nvs_config(CONFIG, partition_table=table, secrets=secrets_for_example(tmp_path), encryption=NvsEncryption()),
        esp32.flash_images(images), seen,
    )
    runs, devices, station_log = await run_boards(product, tmp_path, 1, "B1")
    (run,) = runs
    assert run.outcome is Outcome.PASS, [(p.name, p.outcome, p.reason) for p in run.phases]
    flash = devices[0].board.chip.flash
    key = read_nvs_keys_image(flash.read(0xF000, 0x1000))
    image = flash.read(0x9000, 0x6000)
    with pytest.raises(NvsFormatError):
        read_nvs_image(image)
    on_board = {e.name: e.value for e in read_nvs_image(image, key=key)}
    assert on_board["mqtt.password"] == seen[0]
    summary = json.loads(run.phase("nvs_config").attachments[0].data)
    assert summary["encrypted"] and summary["keys_partition"] == {"label": "nvs_keys", "offset": 0xF000, "size": 0x1000}
    for text in (everything_recorded(run), station_log):
        assert seen[0] not in text and key.hex() not in text and CA_TOKEN not in text


def test_the_phase_factory_checks_the_partition_table_when_the_product_loads(tmp_path: Path) -> None:
    with pytest.raises(NvsError, match=r"flasher_args.json: no partition 'nvs_keys' \(type data, subtype nvs_keys\)"):
        nvs_config(CONFIG, partition_table=FLASHER_ARGS, encryption=NvsEncryption())
    with pytest.raises(NvsError, match=r"no NVS partition 'factory_nvs'"):
        nvs_config(CONFIG, partition_table=FLASHER_ARGS, partition="factory_nvs")
    configure = nvs_config(CONFIG, partition_table=FLASHER_ARGS, encryption=NvsEncryption(keys_partition=None))
    assert set(configure.fixtures) == {"flasher", "dut", "device_config", "secrets"}
    with pytest.raises(ConfigError, match="no such configuration directory"):
        nvs_config(tmp_path / "nowhere", partition_table=FLASHER_ARGS)


def test_the_phase_never_writes_the_device_key_partition_and_refuses_a_table_without_one(tmp_path: Path) -> None:
    # Without a partition of its own the key lives in 'nvs', which the phase
    # rewrites whole: a config write or a retest would erase it.
    assert load_partition_table(FLASHER_ARGS).find(DEVICE_KEYS) is not None  # the shipped build has one
    with pytest.raises(NvsError, match=r"^partition table: no partition 'dev_keys' for the device's key in the "
                                       r"partition table: firmware without one keeps its key in 'nvs', which this "
                                       r"phase rewrites \(a config write or a retest would erase it\); add one"):
        nvs_config(CONFIG, partition_table=single_app_table())
    nvs_config(CONFIG, partition_table=single_app_table(), device_keys=None)  # firmware that keeps no key
    with pytest.raises(NvsError, match=r"partition 'dev_keys' is where the firmware keeps the device's key"):
        nvs_config(CONFIG, partition_table=FLASHER_ARGS, partition=DEVICE_KEYS)
