"""The simulated boards and the TestFirmware client, end to end over ptys."""

from __future__ import annotations

import gc
import re
import resource
import weakref

import attrs
import pytest
import trio
from hypothesis import example, given, settings
from hypothesis import strategies as st

from fixtures import dut
from fixtures.dut import DutIdentity, TestFirmware
from fixtures.serial_link import DeviceError, DeviceTimeout, PortUnavailable, ProtocolError, open_serial_link
from fixtures.sim.device import NOMINAL_RAILS, DeviceProfile, Faults, VirtualDevice, running
from fixtures.sim.farm import open_farm
from fixtures.sim.firmware import COMMANDS, SAMPLE_DT_S, SELFTEST_ITEMS
from fixtures.sim.pty import PtyEndpoint
from sequencer.fixtures import SlotInfo


async def booted(link, timeout: float = 2.0) -> TestFirmware:
    firmware = TestFirmware(link)
    await firmware.wait_boot(timeout)
    return firmware


# ------------------------------------------------------------------ profiles


def test_profiles_are_deterministic_per_seed_and_look_like_espressif_units():
    a = [DeviceProfile.generate(i, seed=5) for i in range(20)]
    assert a == [DeviceProfile.generate(i, seed=5) for i in range(20)]
    assert [p.serial for p in a] != [DeviceProfile.generate(i, seed=6).serial for i in range(20)]
    assert len({p.serial for p in a}) == len({p.mac for p in a}) == 20
    for profile in a:
        assert re.fullmatch(r"SN\d{9}", profile.serial)
        assert profile.mac[:8] in {"24:0A:C4", "30:AE:A4", "A4:CF:12", "24:6F:28", "3C:71:BF"}
        for rail, nominal in NOMINAL_RAILS.items():
            assert abs(profile.rail_level(rail) - nominal) < 0.15
    # Units differ from each other, not just by serial.
    assert len({round(p.rail_level("3V3"), 6) for p in a}) == 20


def test_faults_reject_names_the_firmware_does_not_have():
    with pytest.raises(ValueError, match="unknown rails"):
        Faults(rail_offsets={"12V": 1.0})
    with pytest.raises(ValueError, match="unknown items"):
        Faults(selftest_fail={"sdcard"})
    assert Faults(selftest_fail=["wifi"]).selftest_fail == frozenset({"wifi"})


# ------------------------------------------------------------------ protocol


async def test_boot_banner_and_identity_match_the_profile():
    async with open_farm(2, seed=11) as (first, second):
        async with open_serial_link(second.path) as link:
            firmware = TestFirmware(link)
            banner = await firmware.wait_boot(2)
            p = second.profile
            assert (banner.model, banner.firmware, banner.hardware_rev) == (p.model, p.firmware, p.hardware_rev)
            assert banner.log[0].startswith("ets ")
            assert await firmware.identify() == DutIdentity(p.model, p.serial, p.mac, p.firmware, p.hardware_rev)
        assert first.boot_count == 0  # never opened


async def test_measurements_are_near_the_units_own_values():
    async with open_farm(1, seed=2) as (device,):
        async with open_serial_link(device.path) as link:
            firmware = await booted(link)
            rails = await firmware.read_rails()
            assert set(rails) == set(NOMINAL_RAILS)
            for name, volts in rails.items():
                assert volts == pytest.approx(device.profile.rail_level(name), abs=0.01)
            sht = await firmware.read_sensor("SHT40")
            assert sht["temp_c"] == pytest.approx(device.profile.temperature_c, abs=0.5)
            assert 0 < sht["rh_pct"] < 100
            accel = await firmware.read_sensor("LIS3DH")
            assert accel["z_g"] == pytest.approx(1.0, abs=0.1)
            assert await firmware.self_test() == {item: True for item in SELFTEST_ITEMS}


async def test_sample_returns_the_power_up_ramp():
    async with open_farm(1) as (device,):
        async with open_serial_link(device.path) as link:
            firmware = await booted(link)
            vin = await firmware.sample("VIN", 400)
            assert len(vin) == 400
            assert [t for t, _ in vin[:3]] == pytest.approx([0, SAMPLE_DT_S, 2 * SAMPLE_DT_S])
            assert vin[0][1] < 0.1
            assert vin[-1][1] == pytest.approx(device.profile.rail_level("5V0"), abs=0.05)
            # Rising overall, and the regulator only starts once VIN is up.
            assert all(b[1] > a[1] - 0.02 for a, b in zip(vin, vin[1:]))
            v33 = await firmware.sample("3V3", 400)
            start = next(t for t, v in v33 if v > 0.5)
            vin_then = next(v for t, v in vin if t >= start)
            assert vin_then > 3.5
            assert v33[-1][1] == pytest.approx(device.profile.rail_level("3V3"), abs=0.05)


async def test_sample_takes_points_already_received_without_a_scheduler_trip_each():
    # On a busy station every trip round the scheduler waits for every other
    # runnable task: one trip per point made a 200-point series miss its
    # deadline with 48 slots flashing. Count the sampling task's steps.
    class Steps(trio.abc.Instrument):
        def __init__(self, task: trio.lowlevel.Task) -> None:
            self.task, self.count = task, 0

        def before_task_step(self, task: trio.lowlevel.Task) -> None:
            self.count += task is self.task

    async with open_farm(1) as (device,):
        async with open_serial_link(device.path) as link:
            firmware = await booted(link)
            steps = Steps(trio.lowlevel.current_task())
            trio.lowlevel.add_instrument(steps)
            try:
                points = await firmware.sample("VIN", 4096)
            finally:
                trio.lowlevel.remove_instrument(steps)
    assert len(points) == 4096
    # about 100 kB: the link reads up to 4 kB a time, so a few dozen waits for data, not thousands
    assert steps.count < 200, steps.count


async def test_device_errors_name_port_and_command():
    async with open_farm(1) as (device,):
        async with open_serial_link(device.path) as link:
            firmware = await booted(link)
            with pytest.raises(DeviceError) as caught:
                await firmware.read_sensor("BME280")
            assert str(caught.value) == f"{device.path}: 'SENSOR BME280' failed: unknown sensor BME280"
            assert caught.value.command == "SENSOR BME280"
            with pytest.raises(DeviceError, match="unknown channel VOUT"):
                await firmware.sample("VOUT", 10)
            with pytest.raises(DeviceError, match=r"'SAMPLE VIN 5000' failed: count out of range 1\.\.4096"):
                await firmware.sample("VIN", 5000)
            assert await link.request("FROB") == "ERR unknown command"
            assert await link.request("SENSOR") == "ERR usage: SENSOR <name>"
            assert await link.request("IDENT " + "x" * 300) == "ERR line too long"
            assert await link.request("IDENT \xe9") == "ERR bad encoding"
            assert (await link.request("HELP")).split()[1:] == [
                "IDENT", "RAILS", "SENSOR", "SELFTEST", "SAMPLE", "KEYGEN", "PUBKEY", "SIGN", "LED", "SLEEP", "RESTART",
                "SYNC", "HELP",
            ]
            assert await link.request("SYNC 4f2a") == "SYNC 4f2a"
            assert await link.request("SYNC a-b") == "ERR usage: SYNC <token: 1..32 letters and digits>"
            assert await link.request("LED BLUE") == "ERR usage: LED <GREEN|RED|OFF>"
            with pytest.raises(ValueError, match="LED colour must be one of GREEN, RED, OFF, not 'green'"):
                await firmware.set_led("green")
            await firmware.set_led("RED")
            assert device.led == "RED"
            # After all that the firmware still answers properly.
            assert (await firmware.identify()).serial == device.profile.serial


async def test_parallel_phases_can_share_one_client():
    async with open_farm(1, faults={0: Faults(slow_s=0.01)}) as (device,):
        async with open_serial_link(device.path) as link:
            firmware = await booted(link)
            results = {}

            async def run(name, call):
                results[name] = await call

            async with trio.open_nursery() as nursery:
                nursery.start_soon(run, "rails", firmware.read_rails())
                nursery.start_soon(run, "ramp", firmware.sample("3V3", 200))
                nursery.start_soon(run, "sht", firmware.read_sensor("SHT40"))
                nursery.start_soon(run, "selftest", firmware.self_test())
                nursery.start_soon(run, "ident", firmware.identify())
            assert set(results["rails"]) == set(NOMINAL_RAILS)
            assert len(results["ramp"]) == 200
            assert set(results["sht"]) == {"temp_c", "rh_pct"}
            assert all(results["selftest"].values())
            assert results["ident"].serial == device.profile.serial


async def test_input_sent_while_booting_is_lost_like_on_a_real_board():
    async with open_farm(1) as (device,):
        async with open_serial_link(device.path) as link:
            await link.send_line("IDENT")
            banner = await TestFirmware(link).wait_boot(2)
            assert not any(line.startswith("IDENT") for line in banner.log)
            with pytest.raises(DeviceTimeout):
                await link.read_line(timeout=0.1)


_WORDS = st.text(alphabet="ABCINSVx0123456789-.\t\x1c\x01é", max_size=8)
command_lines = st.one_of(
    st.binary(max_size=300),
    st.tuples(st.sampled_from([*COMMANDS, "ERR", ""]), st.lists(_WORDS, max_size=3)).map(
        lambda parts: " ".join([parts[0], *parts[1]]).encode()
    ),
).filter(lambda line: b"\n" not in line and line.strip())


@settings(max_examples=40, deadline=None)
@given(command=command_lines)
@example(command=b"\x1c\x1f")  # whitespace to str.split(), not to bytes.strip()
@example(command=b"SAMPLE 3V3 3")
@example(command=b"SLEEP")
@example(command=b"RESTART")
async def test_firmware_answers_any_command_line_with_one_line(command):
    async with open_farm(1) as (device,):
        async with open_serial_link(device.path) as link:
            await booted(link)
            await link.write(command + b"\n")
            try:
                reply = await link.read_line(timeout=1)
            except ProtocolError:
                # Only an echo of the host's own control characters may do that.
                assert any(byte < 0x20 and byte != 0x09 for byte in command)
                return
            assert reply.startswith("ERR ") or reply.split()[0] in COMMANDS
            if reply == "RESTART":  # a software reset: the firmware boots again, port open
                await booted(link)
            if reply.split()[0] not in ("SAMPLE", "SLEEP"):  # those go on talking / go quiet
                assert (await TestFirmware(link).identify()).serial == device.profile.serial


# -------------------------------------------------------------------- resets


async def test_closing_the_port_resets_the_board():
    async with open_farm(1) as (device,):
        async with open_serial_link(device.path) as link:
            firmware = await booted(link)
            await firmware.enter_sleep()
        assert device.power == "sleep"
        # Reopen at once: the board must have seen the close and boot again.
        async with open_serial_link(device.path) as link:
            firmware = await booted(link)
            assert device.boot_count == 2
            assert device.power == "active"
            assert (await firmware.identify()).serial == device.profile.serial


async def test_sleeping_board_is_silent_until_reset():
    async with open_farm(1) as (device,):
        async with open_serial_link(device.path) as link:
            firmware = await booted(link)
            await firmware.enter_sleep()
            with pytest.raises(DeviceTimeout, match=r"waiting for a response to 'IDENT'"):
                await TestFirmware(link, timeout=0.1).identify()


async def test_reset_interrupts_a_slow_response():
    async with open_farm(1, faults={0: Faults(slow_s=5.0)}) as (device,):
        async with open_serial_link(device.path) as link:
            firmware = await booted(link)
            await link.send_line("IDENT")  # the board now sits in a 5 s delay
            await trio.sleep(0.02)
        device.faults = Faults()
        async with open_serial_link(device.path) as link:
            firmware = await booted(link)
            assert device.boot_count == 2
            assert (await firmware.identify()).serial == device.profile.serial


async def test_personality_hook_decides_what_runs_after_reset():
    @attrs.frozen
    class Loader:
        async def serve(self, port, device):
            await port.write(b"LOADER\r\n")
            line = await port.read_line()
            assert line == b"GO"
            return dut_personality  # hand over without a reset

    from fixtures.sim.firmware import FirmwarePersonality

    dut_personality = FirmwarePersonality(boot_s=0)
    device = VirtualDevice(DeviceProfile.generate(0), boot=lambda device: Loader())
    try:
        async with running(device.run):
            async with open_serial_link(device.path) as link:
                assert await link.read_line(2) == "LOADER"
                await link.send_line("GO")
                firmware = await booted(link)
                assert device.personality is dut_personality
                assert (await firmware.identify()).serial == device.profile.serial
            async with open_serial_link(device.path) as link:
                assert await link.read_line(2) == "LOADER"
    finally:
        device.close()


# -------------------------------------------------------------------- faults


async def test_garbage_fault_is_a_protocol_error_and_the_link_recovers():
    async with open_farm(1) as (device,):
        async with open_serial_link(device.path) as link:
            firmware = await booted(link)
            device.faults = Faults(garbage=True)
            with pytest.raises(ProtocolError, match=rf"^{device.path}: line is not UTF-8: b'"):
                await firmware.identify()
            device.faults = Faults()
            assert (await firmware.identify()).serial == device.profile.serial


async def test_hung_board_times_out_at_boot_and_mid_session():
    async with open_farm(2, faults={0: Faults(hang=True)}) as (hung, healthy):
        async with open_serial_link(hung.path) as link:
            start = trio.current_time()
            with pytest.raises(DeviceTimeout, match=r"timed out after 0\.3 s waiting for the boot banner"):
                await TestFirmware(link).wait_boot(0.3)
            assert trio.current_time() - start < 0.6
        async with open_serial_link(healthy.path) as link:
            await booted(link)
            healthy.faults = Faults(hang=True)
            with pytest.raises(DeviceTimeout, match=rf"^{healthy.path}: .* response to 'RAILS'"):
                await TestFirmware(link, timeout=0.2).read_rails()


async def test_slow_board_delays_answers_and_late_answers_are_not_misread():
    async with open_farm(1, faults={0: Faults(slow_s=0.15)}) as (device,):
        async with open_serial_link(device.path) as link:
            firmware = await booted(link)
            start = trio.current_time()
            await firmware.identify()
            assert trio.current_time() - start >= 0.15
            with pytest.raises(DeviceTimeout):
                await TestFirmware(link, timeout=0.05).read_rails()
            # The RAILS answer arrives late; the next request must not take it
            # for the answer to IDENT.
            await trio.sleep(0.2)
            assert (await firmware.identify()).serial == device.profile.serial


async def test_an_answer_that_comes_after_its_timeout_is_skipped_not_taken_for_the_next():
    # A board answering 0.15 s late to a 0.1 s timeout answers IDENT after
    # RAILS has gone out; taken as RAILS's answer it failed the phase.
    async with open_farm(1, faults={0: Faults(slow_s=0.15)}) as (device,):
        async with open_serial_link(device.path) as link:
            firmware = await booted(link)
            for command in ("IDENT", "HELP"):  # two abandoned commands owe two answers
                with pytest.raises(DeviceTimeout, match=f"waiting for a response to '{command}'"):
                    await firmware.query(command, timeout=0.1)
            rails = await firmware.read_rails()
            assert set(rails) == set(NOMINAL_RAILS)
            with pytest.raises(DeviceTimeout):  # a series' header is read the same way
                await firmware.query("IDENT", timeout=0.1)
            assert len(await firmware.sample("3V3", 5)) == 5
            # Owed answers are spent: an answer that echoes another command is still an error.
            assert (await firmware.identify()).serial == device.profile.serial
            await link.send_line("HELP")
            with pytest.raises(ProtocolError, match="response to 'RAILS' does not echo it: 'HELP "):
                await firmware.read_rails()


@pytest.mark.parametrize(
    "late, then",
    [
        (lambda fw: fw.read_sensor("BME280"), lambda fw: fw.identify()),  # a late ERR echoes no command
        (lambda fw: fw.sample("3V3", 50), lambda fw: fw.read_rails()),  # a late series is many lines
        (lambda fw: fw.read_sensor("SHT40"), lambda fw: fw.read_sensor("LIS3DH")),  # the same first word
    ],
    ids=["late ERR", "late SAMPLE series", "late answer to the same command"],
)
async def test_whatever_an_abandoned_command_still_sends_is_skipped(late, then):
    async with open_farm(1) as (device,):
        async with open_serial_link(device.path) as link:
            firmware = await booted(link)
            firmware.timeout = 0.1
            device.faults = Faults(slow_s=0.2)  # answers after the command gave up on it
            with pytest.raises(DeviceTimeout):
                await late(firmware)
            device.faults = Faults()
            firmware.timeout = 1.0
            assert await then(firmware)  # its own answer, not the one left over


async def test_a_device_that_answers_only_garbage_says_so_not_that_it_is_silent():
    async with open_farm(1) as (device,):
        async with open_serial_link(device.path) as link:
            firmware = await booted(link)
            device.faults = Faults(garbage=True)
            with pytest.raises(ProtocolError, match="line is not UTF-8"):
                await firmware.identify()
            with pytest.raises(ProtocolError, match=r"line is not UTF-8.*no readable line since; waited 1 s for a "
                                                    r"response to 'RAILS'"):
                await firmware.read_rails()  # resynchronising first: garbage again


async def test_a_firmware_that_skipped_garbage_is_freed_as_soon_as_it_is_dropped():
    # The unreadable line it skipped while resynchronising was kept as the
    # error itself, whose traceback held the firmware: a reference cycle that
    # kept each such run's firmware, link and transcript until a full collection.
    async with open_farm(1) as (device,):
        async with open_serial_link(device.path) as link:
            firmware = await booted(link)
            device.faults = Faults(garbage=True)
            gc.collect()
            gc.disable()
            try:
                for _ in range(2):  # the second resynchronises, skipping garbage
                    try:
                        await firmware.read_rails()
                    except ProtocolError:
                        pass
                dropped = weakref.ref(firmware)
                del firmware
                # trio's run loop holds the cancellation that last resumed this task until it resumes it again
                await trio.lowlevel.checkpoint()
                assert dropped() is None
            finally:
                gc.enable()


async def test_overlong_fault_is_a_protocol_error():
    async with open_farm(1, faults={0: Faults(overlong=True)}) as (device,):
        async with open_serial_link(device.path, max_line=1024) as link:
            firmware = await booted(link)
            with pytest.raises(ProtocolError, match="line longer than 1024 bytes"):
                await firmware.identify()


async def test_rail_and_selftest_faults_show_in_the_readings():
    faults = Faults(rail_offsets={"3V3": -0.35}, selftest_fail={"psram"})
    async with open_farm(1, faults={0: faults}) as (device,):
        async with open_serial_link(device.path) as link:
            firmware = await booted(link)
            rails = await firmware.read_rails()
            assert rails["3V3"] == pytest.approx(device.profile.rail_level("3V3") - 0.35, abs=0.01)
            assert rails["5V0"] == pytest.approx(device.profile.rail_level("5V0"), abs=0.01)
            results = await firmware.self_test()
            assert [item for item, ok in results.items() if not ok] == ["psram"]


# ---------------------------------------------- client strictness (scripted)


@pytest.mark.parametrize(
    ("answer", "error", "message"),
    [
        (b"RAILS 3V3=3.3 5V0=five\r\n", ProtocolError, r"5V0='five' is not a number in response to 'RAILS'"),
        (b"RAILS 3V3=3.3 3V3=3.3\r\n", ProtocolError, r"malformed field '3V3=3.3'"),
        (b"RAILS\r\n", ProtocolError, r"response to 'RAILS' has no values"),
        (b"IDENT model=x\r\n", ProtocolError, r"response to 'RAILS' does not echo it: 'IDENT model=x'"),
        (
            b"RAILS " + b" ".join(b"R%d=1.0" % i for i in range(40)) + b" X=nan\r\n",
            ProtocolError,
            r"X='nan' is not a number in response to 'RAILS': 'RAILS R0=1.0 .*'\.\.\. \(\d+ chars\)$",
        ),
        (b"ERR adc busy\r\n", DeviceError, r"'RAILS' failed: adc busy$"),
    ],
)
async def test_malformed_responses_are_rejected_with_the_text(answer, error, message):
    with PtyEndpoint() as endpoint:

        async def device():
            assert await endpoint.read() == b"RAILS\n"
            await endpoint.write(answer)

        async with open_serial_link(endpoint.path) as link, trio.open_nursery() as nursery:
            nursery.start_soon(device)
            with pytest.raises(error, match=message) as caught:
                await TestFirmware(link).read_rails()
            assert str(caught.value).startswith(f"{endpoint.path}: ")


async def test_identity_fields_are_validated():
    with PtyEndpoint() as endpoint:

        async def device():
            await endpoint.read()
            await endpoint.write(b"IDENT model=m serial=S mac=not-a-mac fw=1 hw=A\r\n")
            await endpoint.read()
            await endpoint.write(b"IDENT model=m serial=S fw=1\r\n")

        async with open_serial_link(endpoint.path) as link, trio.open_nursery() as nursery:
            nursery.start_soon(device)
            with pytest.raises(ProtocolError, match="'not-a-mac' is not a MAC address"):
                await TestFirmware(link).identify()
            with pytest.raises(ProtocolError, match="lacks mac, hw"):
                await TestFirmware(link).identify()


async def test_wait_boot_skips_noise_and_requires_a_boot_line():
    with PtyEndpoint() as endpoint:
        async with open_serial_link(endpoint.path) as link:
            await endpoint.write(b"\xf0\x9f\xff\xfe\r\nrst:0x1\r\nBOOT esp32-x fw=2.0 hw=D\r\nREADY\r\n")
            banner = await TestFirmware(link).wait_boot(1)
            assert (banner.model, banner.firmware, banner.hardware_rev, banner.unreadable) == ("esp32-x", "2.0", "D", 1)
            await endpoint.write(b"rst:0x1\r\nREADY\r\n")
            with pytest.raises(ProtocolError, match="READY without a BOOT line"):
                await TestFirmware(link).wait_boot(1)


# --------------------------------------------------------- factory and farm


async def test_fixture_factory_opens_boots_and_releases_the_slot_port():
    factory = dut.test_firmware(boot_timeout=2)
    async with open_farm(1) as (device,):
        slot = SlotInfo(index=0, port=device.path, station="bench")
        async with factory(slot) as firmware:
            assert isinstance(firmware, TestFirmware)
            assert (await firmware.identify()).mac == device.profile.mac
            link = firmware.link
        assert link.closed
        async with factory(slot) as firmware:  # port released, board reset
            assert device.boot_count == 2


async def test_farm_of_64_identified_concurrently():
    identities: dict[int, DutIdentity] = {}

    async def identify(device):
        async with open_serial_link(device.path) as link:
            identities[device.profile.index] = await (await booted(link, 5)).identify()

    with trio.fail_after(10):
        async with open_farm(64, seed=42) as devices:
            assert [d.profile.index for d in devices] == list(range(64))
            async with trio.open_nursery() as nursery:
                for device in devices:
                    nursery.start_soon(identify, device)
    serials = [identities[i].serial for i in range(64)]
    assert len(set(serials)) == 64
    assert len({identity.mac for identity in identities.values()}) == 64
    assert serials == [DeviceProfile.generate(i, seed=42).serial for i in range(64)]
    assert serials != [DeviceProfile.generate(i, seed=43).serial for i in range(64)]


@pytest.fixture
def descriptors_for_256_ports():
    """pyserial holds 5 fds per open port: 256 ports need more than 1024."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = 4096 if hard == resource.RLIM_INFINITY else min(4096, hard)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, wanted), hard))
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


async def test_farm_scales_to_256_boards_in_one_process(descriptors_for_256_ports):
    serials: set[str] = set()

    async def identify(device):
        async with open_serial_link(device.path) as link:
            serials.add((await (await booted(link, 10)).identify()).serial)

    with trio.fail_after(15):
        async with open_farm(256, seed=1) as devices:
            async with trio.open_nursery() as nursery:
                for device in devices:
                    nursery.start_soon(identify, device)
    assert len(serials) == 256


async def test_farm_releases_ptys_and_rejects_stray_faults():
    async with open_farm(3) as devices:
        paths = [d.path for d in devices]
    for path in paths:  # the pty pairs are gone with their masters
        with pytest.raises(PortUnavailable, match="no such port"):
            async with open_serial_link(path):
                pass
    with pytest.raises(ValueError, match=r"faults given for devices \[5\]"):
        async with open_farm(3, faults={5: Faults(hang=True)}):
            pass


async def test_farm_body_exceptions_come_out_unwrapped():
    with pytest.raises(KeyError):
        async with open_farm(2):
            raise KeyError("from the test body")
