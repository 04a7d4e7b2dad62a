"""Cellular identity: the AT client against the simulated SIM7600 over real ptys, the APN
table, and the phase end to end through the engine."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from fixtures.modem import CME_ERRORS, AtModem, ModemError, at_modem, slot_ports
from fixtures.serial_link import DeviceTimeout, open_serial_link
from fixtures.sim.pty import PtyEndpoint
from fixtures.sim.modem import ModemFaults, ModemIdentity, ModemTiming, open_modems
from phases.cellular import (
    DEFAULT_APN_TABLE,
    ApnEntry,
    ApnTable,
    ApnTableError,
    cellular_identity_phase,
    is_valid_imei,
    load_apn_table,
    luhn_valid,
)
from sequencer.fixtures import SlotInfo
from sequencer.product import Product
from sequencer.records import Outcome
from tests.conftest import run_product


# ------------------------------------------------------------ client and sim


async def test_identity_read_over_a_pty_matches_the_module() -> None:
    async with open_modems(3, seed=5) as modems:
        for modem in modems:
            async with open_serial_link(modem.path) as link:
                at = AtModem(link)
                await at.sync()
                assert await at.imei() == modem.imei
                assert await at.sim_status() == "READY"
                assert await at.imsi() == modem.imsi
                assert await at.iccid() == modem.iccid
                info = await at.info()
                assert (info.manufacturer, info.model) == ("SIMCOM INCORPORATED", "SIMCOM_SIM7600G-H")
                assert at.echo is True  # ATE1 is the power-up default
                assert "RDY" in at.urcs and "+CPIN: READY" in at.urcs
        # Every unit is different, every IMEI is valid and shares the SIM7600 TAC.
        assert len({m.imei for m in modems}) == len({m.imsi for m in modems}) == 3
        assert all(is_valid_imei(m.imei) and m.imei.startswith("86802003") for m in modems)
        assert all(m.imsi.startswith("310410") and len(m.imsi) == 15 for m in modems)
        assert all(luhn_valid(m.iccid) and len(m.iccid) == 20 and m.iccid.startswith("89") for m in modems)


async def test_wire_format_echo_framing_and_power_up_urcs() -> None:
    # The bytes a real SIM7600 sends, checked without the client's help.
    async with open_modems(1, seed=2) as (modem,):
        async with open_serial_link(modem.path, timeout=2.0) as link:
            boot = await link.read_until(b"PB DONE\r\n")
            assert boot == b"\r\nRDY\r\n\r\n+CPIN: READY\r\n\r\nSMS DONE\r\n\r\nPB DONE\r\n"
            await link.write(b"AT+CGSN\r")
            answer = await link.read_until(b"OK\r\n")
            assert answer == b"AT+CGSN\r\r\n" + modem.imei.encode() + b"\r\n\r\nOK\r\n"
            await link.write(b"ATE0\r")
            assert await link.read_until(b"OK\r\n") == b"ATE0\r\r\nOK\r\n"  # echoed before it takes effect
            await link.write(b"AT+CICCID\r")
            assert await link.read_until(b"OK\r\n") == b"\r\n+ICCID: " + modem.iccid.encode() + b"\r\n\r\nOK\r\n"
            await link.write(b"AT+CPIN?\r")
            assert await link.read_until(b"OK\r\n") == b"\r\n+CPIN: READY\r\n\r\nOK\r\n"
            # Verbose CME errors are the power-up default; an unknown command is a plain ERROR.
            await link.write(b"AT+CMEE?\r")
            assert await link.read_until(b"OK\r\n") == b"\r\n+CMEE: 2\r\n\r\nOK\r\n"
            await link.write(b"AT+BOGUS\r")
            assert await link.read_until(b"ERROR\r\n") == b"\r\nERROR\r\n"


async def test_echo_off_and_concatenated_commands() -> None:
    async with open_modems(1) as (modem,):
        async with open_serial_link(modem.path) as link:
            at = AtModem(link)
            await at.sync()
            assert await at.command("ATE0+CMEE=1") == ()
            assert await at.command("AT+CMEE?") == ("+CMEE: 1",)
            assert at.echo is False
            assert await at.imei() == modem.imei
            assert await at.imsi() == modem.imsi
            assert "[echo]" not in at.transcript_text().split("ATE0+CMEE=1  [echo]", 1)[1]
            # ATZ: back to the power-up settings, echo on.
            await at.command("ATZ")
            assert await at.imei() == modem.imei and at.echo is True


async def test_urcs_between_echo_and_response_are_kept_not_returned() -> None:
    async with open_modems(1, faults={0: ModemFaults(urc_chatter=True)}) as (modem,):
        async with open_serial_link(modem.path) as link:
            at = AtModem(link)
            await at.sync()
            for _ in range(2):
                assert await at.imei() == modem.imei
                assert await at.imsi() == modem.imsi
                assert await at.iccid() == modem.iccid
            assert await at.command("AT+CPIN?") == ("+CPIN: READY",)  # +CPIN: answers AT+CPIN?
            urcs = at.urcs
            assert "+CREG: 2" in urcs and '+CEREG: 1,"1A2B","0C8F5E01",7' in urcs
            assert "+CREG: 1  [URC]" in at.transcript_text()


async def test_urcs_arriving_while_the_module_boots() -> None:
    # A client that starts talking at once meets RDY, +CPIN: READY, SMS DONE
    # and PB DONE between its responses, and SIM busy before the SIM is up.
    timing = ModemTiming(rdy_s=0.01, sim_ready_s=0.3, sms_done_s=0.35, pb_done_s=0.4)
    async with open_modems(1, timing=timing) as (modem,):
        async with open_serial_link(modem.path) as link:
            at = AtModem(link)
            await at.sync()
            with pytest.raises(ModemError) as busy:
                await at.imsi()
            assert busy.value.code == 14 and "SIM busy" in str(busy.value)
            assert await at.sim_status(timeout=2) == "READY"  # waits the busy SIM out
            while "PB DONE" not in at.urcs:
                assert await at.imei() == modem.imei
            assert await at.imsi() == modem.imsi
            assert at.urcs[0] == "RDY" and {"SMS DONE", "PB DONE"} <= set(at.urcs)
            # +CPIN: READY, the URC, may arrive while AT+CPIN? is being answered;
            # then it is indistinguishable from the answer, and as good.
            assert at.transcript_text().count("RX +CPIN: READY") >= 2


@pytest.mark.parametrize(
    "cmee, line, code",
    [("1", "+CME ERROR: 10", 10), ("2", "+CME ERROR: SIM not inserted", 10), ("0", "ERROR", None)],
)
async def test_sim_absent_is_cme_10_in_every_error_mode(cmee: str, line: str, code: int | None) -> None:
    async with open_modems(1, faults={0: ModemFaults(sim_absent=True)}) as (modem,):
        async with open_serial_link(modem.path) as link:
            at = AtModem(link)
            await at.sync()
            await at.command(f"AT+CMEE={cmee}")
            assert await at.imei() == modem.imei  # the module itself still answers
            for read in (at.imsi, at.iccid, at.sim_status):
                with pytest.raises(ModemError) as caught:
                    await read()
                assert caught.value.line == line and caught.value.code == code
            if code is not None:
                assert caught.value.reason == "SIM not inserted (+CME ERROR: 10)"
                assert str(caught.value) == f"{modem.path}: 'AT+CPIN?' failed: SIM not inserted (+CME ERROR: 10)"
            assert "+SIMCARD: NOT AVAILABLE" in at.urcs and "+CPIN: READY" not in at.urcs


async def test_error_on_a_command_and_the_iccid_fallback() -> None:
    faults = {0: ModemFaults(error_on={"AT+CGSN"}), 1: ModemFaults(error_on={"+CICCID"})}
    async with open_modems(2, faults=faults) as modems:
        async with open_serial_link(modems[0].path) as link:
            at = AtModem(link)
            await at.sync()
            with pytest.raises(ModemError) as caught:
                await at.imei()
            assert caught.value.code is None and caught.value.kind is None
            assert str(caught.value) == f"{modems[0].path}: 'AT+CGSN' failed: ERROR"
            assert await at.imsi() == modems[0].imsi
        async with open_serial_link(modems[1].path) as link:
            at = AtModem(link)
            await at.sync()
            assert await at.iccid() == modems[1].iccid  # via AT+CCID
            assert "TX AT+CCID" in at.transcript_text()


def test_modem_faults_name_known_commands() -> None:
    assert ModemFaults(error_on="at+cimi").error_on == frozenset({"+CIMI"})
    with pytest.raises(ValueError, match=r"unknown commands \['\+COPS'\]"):
        ModemFaults(error_on={"AT+COPS?"})
    with pytest.raises(ValueError, match="faults given for modems"):
        trio.run(_open_with_stray_fault)


async def _open_with_stray_fault() -> None:
    async with open_modems(2, faults={2: ModemFaults()}):
        pass


async def test_silent_module_times_out_naming_port_and_command() -> None:
    async with open_modems(1, faults={0: ModemFaults(silent=True)}) as (modem,):
        async with open_serial_link(modem.path) as link:
            at = AtModem(link, timeout=0.2)
            with pytest.raises(DeviceTimeout) as caught:
                await at.sync(timeout=0.6)
            assert str(caught.value).startswith(f"{modem.path}: timed out after 0.6 s waiting for the module")
            assert "it said nothing" in str(caught.value)
            with pytest.raises(DeviceTimeout) as caught:
                await at.command("AT+CGSN")
            message = str(caught.value)
            assert modem.path in message and "'AT+CGSN'" in message and "no echo or answer" in message


@pytest.mark.parametrize("echo", [True, False])
async def test_a_late_answer_is_not_read_as_the_next_commands(echo: bool) -> None:
    async with open_modems(1) as (modem,):
        async with open_serial_link(modem.path) as link:
            at = AtModem(link, timeout=0.1)
            await at.sync()
            if not echo:
                await at.command("ATE0")
            modem.faults = ModemFaults(slow_s=0.25)
            with pytest.raises(DeviceTimeout) as caught:
                await at.imei()
            if echo:
                assert "echoed the command but did not answer" in str(caught.value)
            modem.faults = ModemFaults()
            # The IMEI arrives during this command; it must not be taken for the IMSI.
            assert await at.command("AT+CIMI", timeout=1.0) == (modem.imsi,)
            assert f"RX {modem.imei}  [stale]" in at.transcript_text()
            assert await at.imei() == modem.imei


async def test_with_echo_off_a_dropped_command_costs_only_itself() -> None:
    # Nothing ever answers the dropped command: counted as owed, the next
    # command's own OK was thrown away, and every command after it timed out.
    async with open_modems(1) as (modem,):
        async with open_serial_link(modem.path) as link:
            at = AtModem(link, timeout=0.3)
            await at.sync()
            await at.command("ATE0")
            modem.faults = ModemFaults(silent=True)
            with pytest.raises(DeviceTimeout):
                await at.command("AT+CGMI")
            modem.faults = ModemFaults()
            assert await at.imei() == modem.imei
            assert await at.imsi() == modem.imsi
            assert await at.command("AT") == ()


async def test_lines_with_control_characters_never_become_values() -> None:
    async def module(end: PtyEndpoint) -> None:
        got = b""
        while not got.endswith(b"\r"):
            got += await end.read()
        await end.write(b"\r\n+CPIN: READY\x1b]0;owned\x07\r\n\r\nOK\r\n")

    with PtyEndpoint() as end:
        async with open_serial_link(end.path) as link, trio.open_nursery() as nursery:
            nursery.start_soon(module, end)
            at = AtModem(link, timeout=2.0)
            assert await at.command("AT+CPIN?") == ()  # the line is skipped as unreadable
    assert at.unreadable == 1
    assert "\\x07" in at.transcript_text() and "\x07" not in at.transcript_text()  # shown escaped, never sent


async def test_an_at_that_crossed_the_boot_message_is_answered_late_and_not_taken_for_the_next() -> None:
    # Seen with 256 simulated trackers: the host's first AT reached the module
    # just after it booted, while its RDY was on the wire. The sync took RDY as
    # "what came before was dropped" and sent a second AT; both were answered,
    # the second too late for the sync, and every later command then read the
    # answer of the one before (the IMEI query got "AT+CMEE=1").
    imei = "356938035643809"

    async def module(end: PtyEndpoint) -> None:
        async def expect(command: bytes) -> None:
            got = b""
            while not got.endswith(b"\r"):
                got += await end.read()
            assert got == command + b"\r"

        await expect(b"AT")
        await end.write(b"\r\nRDY\r\n")  # crossed the AT on the wire
        await expect(b"AT")
        await end.write(b"AT\r\r\nOK\r\n")  # the first AT's answer
        await trio.sleep(0.3)  # the second's comes late: the sync has ended (0.1 s of quiet)
        await expect(b"AT+CMEE=1")
        await end.write(b"AT\r\r\nOK\r\nAT+CMEE=1\r\r\nOK\r\n")
        await expect(b"AT+CGSN")
        await end.write(b"AT+CGSN\r\r\n" + imei.encode() + b"\r\n\r\nOK\r\n")

    with PtyEndpoint() as end:
        async with open_serial_link(end.path) as link, trio.open_nursery() as nursery:
            nursery.start_soon(module, end)
            at = AtModem(link, timeout=2.0)
            await at.sync()
            assert await at.command("AT+CMEE=1") == ()
            assert await at.command("AT+CGSN") == (imei,)
    assert "RX AT  [stale]" in at.transcript_text() and "RX OK  [stale]" in at.transcript_text()


async def test_fixture_factory_maps_the_slot_to_its_modem_port() -> None:
    async with open_modems(2) as modems:
        factory = at_modem(slot_ports({1: modems[1].path}), ready_timeout=2.0)
        async with factory(SlotInfo(1, "/dev/ttyUSB1", "st")) as at:
            assert await at.imei() == modems[1].imei
            assert "TX AT+CMEE=1" in at.transcript_text()  # numeric CME codes asked for
        with pytest.raises(LookupError, match=r"slot 0 \(/dev/ttyUSB0\) has no modem port"):
            async with factory(SlotInfo(0, "/dev/ttyUSB0", "st")):
                pass


# ---------------------------------------------------------------------- Luhn


def test_luhn_and_imei_validity() -> None:
    # IMEIs of shipped SIMCom modules, and the textbook Luhn example.
    assert is_valid_imei("868020030145634") and is_valid_imei("864643060188952")
    assert luhn_valid("79927398713") and not luhn_valid("79927398710")
    assert not is_valid_imei("868020030145635")  # check digit off by one
    assert not is_valid_imei("86802003014563")  # 14 digits
    assert not is_valid_imei(868020030145634) and not is_valid_imei("8680200301456３4")


@given(index=st.integers(0, 10**6), seed=st.integers(0, 2**32), plmn=st.sampled_from(["310410", "23415", "00101"]))
def test_generated_identities_are_valid(index: int, seed: int, plmn: str) -> None:
    identity = ModemIdentity.generate(index, seed, plmn)
    assert is_valid_imei(identity.imei)
    assert identity.imsi.startswith(plmn) and len(identity.imsi) == 15
    assert luhn_valid(identity.iccid) and len(identity.iccid) == 20


async def test_bad_imei_fault_breaks_only_the_check_digit() -> None:
    async with open_modems(1, faults={0: ModemFaults(bad_imei=True)}) as (modem,):
        assert modem.imei[:-1] == modem.identity.imei[:-1] and not is_valid_imei(modem.imei)
        async with open_serial_link(modem.path) as link:
            at = AtModem(link)
            await at.sync()
            assert await at.imei() == modem.imei


def test_cme_table_agrees_with_the_simulator() -> None:
    from fixtures.sim import modem as sim

    for code, text in sim._CME_TEXT.items():
        assert CME_ERRORS[code] == text


# ----------------------------------------------------------------- APN table

_prefix = st.text("012", min_size=5, max_size=8)


@settings(max_examples=300)
@given(prefixes=st.sets(_prefix, min_size=1, max_size=25), imsi=st.text("012", min_size=6, max_size=15))
def test_lookup_returns_the_longest_matching_prefix(prefixes: set[str], imsi: str) -> None:
    table = ApnTable(tuple(ApnEntry(p, f"apn{i}") for i, p in enumerate(sorted(prefixes))))
    matching = [p for p in prefixes if imsi.startswith(p)]
    expected = max(matching, key=len) if matching else None
    found = table.lookup(imsi)
    assert (found.prefix if found else None) == expected


def test_shipped_table_loads_and_prefers_the_mvno_range() -> None:
    table = load_apn_table(DEFAULT_APN_TABLE)
    assert table.lookup("310410123456789").apn == "broadband"
    assert table.lookup("310260912345678").apn == "wireless.twilio.com"
    assert table.lookup("310260112345678").apn == "fast.t-mobile.com"
    vodafone = table.lookup("234150123456789")
    assert (vodafone.apn, vodafone.username) == ("wap.vodafone.co.uk", "wap")
    assert table.lookup("001010123456789") is None
    with pytest.raises(ValueError):
        table.lookup("31041O")


def _entry(prefix: str = '"310410"', apn: str = '"broadband"', extra: str = "") -> str:
    return f"[[network]]\nprefix = {prefix}\napn = {apn}\n{extra}\n"


@pytest.mark.parametrize(
    "text, message",
    [
        (_entry() + _entry('"31041O"'), "network entry 2 (prefix '31041O'): prefix must be digits only"),
        (
            _entry() + _entry('"23415"') + _entry(),
            "network entry 3 (prefix '310410'): duplicate prefix; network entry 1 has it",
        ),
        ('[[network]]\nprefix = "310410"\n', "network entry 1 (prefix '310410'): missing 'apn'"),
        ('[[network]]\napn = "internet"\n', "network entry 1: missing 'prefix'"),
        (_entry("310410"), "network entry 1: prefix must be a quoted string of digits, not 310410"),
        (_entry('"3104"'), "prefix must be 5 to 15 digits (MCC+MNC or longer), not 4"),
        (_entry(apn='"broad band"'), "apn 'broad band' is not an APN"),
        (_entry(extra='user = "x"'), "unknown key 'user' (keys: prefix, apn, username, password, operator)"),
        (_entry(extra="password = 1234"), "password must be a string (in quotes), not a int"),
        ('[networks]\nx = 1\n', "unknown key 'networks'; the table is [[network]] entries"),
        ("", "no [[network]] entries"),
        ("[[network]\n", "not valid TOML"),
    ],
)
def test_apn_table_errors_are_one_line_naming_file_and_entry(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "apn.toml"
    path.write_text(text)
    with pytest.raises(ApnTableError) as caught:
        load_apn_table(path)
    assert str(caught.value).startswith(f"{path}: ")
    assert message in str(caught.value)
    assert "\n" not in str(caught.value)
    if "password = 1234" in text:
        assert "1234" not in str(caught.value)  # a password is never quoted back


def test_missing_table_file(tmp_path: Path) -> None:
    with pytest.raises(ApnTableError, match=r"apn\.toml: cannot read the APN table"):
        load_apn_table(tmp_path / "apn.toml")
    with pytest.raises(ApnTableError):
        cellular_identity_phase(tmp_path / "apn.toml")  # a product with a broken table does not load


# --------------------------------------------------------------------- phase


async def test_phase_end_to_end_through_the_engine(store_path: Path) -> None:
    faults = {
        1: ModemFaults(sim_absent=True),
        2: ModemFaults(bad_imei=True),
        3: ModemFaults(error_on={"+CGSN"}),
        5: ModemFaults(urc_chatter=True),
    }
    plmns = {4: "00101", 5: "310260"}  # 00101: the 3GPP test network, not in the table
    async with open_modems(7, seed=11, faults=faults, plmns=plmns) as modems:
        modems[6].faults = ModemFaults(silent=True)
        product = Product(
            name="cellular-test",
            phases=[cellular_identity_phase()],
            fixtures={"modem": at_modem(slot_ports([m.path for m in modems]), ready_timeout=1.0)},
        )
        runs = await run_product(product, store_path, slots=7)

    ok = runs[0]
    assert ok.outcome is Outcome.PASS
    assert {k: ok.dut[k] for k in ("imei", "imsi", "iccid", "apn")} == {
        "imei": modems[0].imei, "imsi": modems[0].imsi, "iccid": modems[0].iccid, "apn": "broadband",
    }
    record = ok.phase("cellular_identity")
    assert {m.name: m.value for m in record.measurements}["sim_status"] == "READY"
    transcript = record.attachments[0]
    assert transcript.name == "modem.txt" and b"TX AT+CIMI" in transcript.data

    absent = runs[1].phase("cellular_identity")
    assert absent.outcome is Outcome.FAIL
    assert absent.reason == "measurement 'sim_status': SIM not inserted (+CME ERROR: 10)"
    assert runs[1].dut["imei"] == modems[1].imei and "imsi" not in runs[1].dut

    bad = runs[2].phase("cellular_identity")
    assert bad.outcome is Outcome.FAIL
    assert bad.reason == (
        f"measurement 'imei': '{modems[2].imei}' fails: 15 digits with a valid Luhn check digit"
    )

    refused = runs[3].phase("cellular_identity")
    assert refused.outcome is Outcome.ERROR
    assert refused.reason == f"ModemError: {modems[3].path}: 'AT+CGSN' failed: ERROR"
    assert refused.attachments and b"TX AT+CGSN" in refused.attachments[0].data

    unlisted = runs[4].phase("cellular_identity")
    assert unlisted.outcome is Outcome.FAIL
    assert unlisted.reason == (
        f"measurement 'imsi': no APN for IMSI {modems[4].imsi} in apn.toml (no listed prefix matches it)"
    )
    assert "apn" not in runs[4].dut and runs[4].dut["imsi"] == modems[4].imsi

    chatty = runs[5]
    assert chatty.outcome is Outcome.PASS and chatty.dut["apn"] == "fast.t-mobile.com"
    assert b"[URC]" in chatty.phase("cellular_identity").attachments[0].data

    silent = runs[6].phase("cellular_identity")
    assert silent.outcome is Outcome.ERROR
    # The modem fixture could not open: the reason names it, then says why.
    assert silent.reason.startswith(f"fixture 'modem' cannot open: DeviceTimeout: {modems[6].path}: timed out after "
                                    "1 s waiting for the module")
