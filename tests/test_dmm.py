"""The SCPI multimeter client against the simulated meter on a pty."""

from __future__ import annotations

import pytest
import trio

from fixtures import instruments
from fixtures.dut import TestFirmware
from fixtures.instruments import Dmm, InstrumentIdentity, open_dmm
from fixtures.serial_link import DeviceError, DeviceTimeout, open_serial_link
from fixtures.sim.dmm import SimDmm, open_sim_dmm
from fixtures.sim.farm import open_farm
from sequencer.fixtures import SlotInfo


async def test_identify_and_measure_take_realistic_time():
    async with open_sim_dmm(seed=3, voltage=lambda: 1.2345, current=lambda: 0.0123) as meter:
        async with open_dmm(meter.path) as dmm:
            identity = await dmm.identify()
            assert identity == InstrumentIdentity("SIMTEK", "DMM-6500S", meter.serial, "1.2.0")
            start = trio.current_time()
            volts = await dmm.measure_voltage()
            elapsed = trio.current_time() - start
            assert volts == pytest.approx(1.2345, abs=1e-3)
            assert volts != 1.2345  # a real reading has noise
            assert 0.02 <= elapsed < 0.3
            assert await dmm.measure_current() == pytest.approx(0.0123, rel=1e-2)
            assert meter.measurements == 2


async def test_configured_reads_and_autorange():
    async with open_sim_dmm(voltage=lambda: 3.3, current=lambda: 0.5) as meter:
        async with open_dmm(meter.path) as dmm:
            await dmm.configure_current()
            assert await dmm.read() == pytest.approx(0.5, rel=1e-2)
            await dmm.configure_voltage(10)
            assert await dmm.read() == pytest.approx(3.3, abs=1e-3)
            await dmm.reset()
            assert await dmm.read() == pytest.approx(3.3, abs=1e-3)  # *RST: DC volts


async def test_fixed_range_overload_is_a_device_error():
    async with open_sim_dmm(voltage=lambda: 3.3) as meter:
        async with open_dmm(meter.path) as dmm:
            with pytest.raises(DeviceError, match=r"'MEAS:VOLT:DC\? 1' failed: overload"):
                await dmm.measure_voltage(range=1)
            assert await dmm.measure_voltage(range=10) == pytest.approx(3.3, abs=1e-3)


async def test_rejected_commands_are_explained_from_the_error_queue():
    async with open_sim_dmm() as meter:
        async with open_dmm(meter.path, timeout=0.2) as dmm:
            with pytest.raises(DeviceError) as caught:
                await dmm.configure_voltage(5000)
            assert str(caught.value) == f'{meter.path}: \'CONF:VOLT:DC 5000\' failed: -222,"Data out of range"'
            # A query the meter does not know: silence, then the reason.
            start = trio.current_time()
            with pytest.raises(DeviceError, match=r"'MEAS:RES\?' failed: -113,\"Undefined header\""):
                await dmm.query("MEAS:RES?")
            assert trio.current_time() - start < 1.0
            assert await dmm.errors() == []


async def test_silent_meter_is_a_timeout():
    async with open_sim_dmm() as meter:
        async with open_dmm(meter.path, timeout=0.1) as dmm:
            meter.delay_s = (0.3, 0.3)  # integration time longer than we wait
            with pytest.raises(DeviceTimeout, match=r"waiting for a response to 'MEAS:VOLT:DC\?'"):
                await dmm.measure_voltage()


async def test_scpi_long_forms_and_case_are_accepted():
    async with open_sim_dmm(voltage=lambda: 2.5) as meter:
        async with open_serial_link(meter.path, 9600) as link:
            assert float(await link.request(":measure:voltage?")) == pytest.approx(2.5, abs=1e-3)
            assert float(await link.request("MEASure:VOLTage:DC?")) == pytest.approx(2.5, abs=1e-3)
            assert await link.request("*opc?") == "1"
            await link.send_line("BOGUS:THING")
            assert await link.request("SYSTem:ERRor?") == '-113,"Undefined header"'
            assert await link.request("SYST:ERR?") == '+0,"No error"'


async def test_meter_probing_a_dut_sees_its_rail_and_its_sleep_current():
    async with open_farm(1, seed=9) as (device,), open_sim_dmm() as meter:
        meter.attach(device, rail="3V3")
        async with open_dmm(meter.path) as dmm, open_serial_link(device.path) as link:
            firmware = TestFirmware(link)
            await firmware.wait_boot(2)
            dut_says = (await firmware.read_rails())["3V3"]
            assert await dmm.measure_voltage() == pytest.approx(dut_says, abs=0.01)
            active = await dmm.measure_current()
            await firmware.enter_sleep()
            asleep = await dmm.measure_current()
            assert active == pytest.approx(device.profile.active_current_a, rel=0.1)
            assert 1e-6 < asleep < 50e-6


async def test_factory_opens_the_meter_and_releases_it():
    async with open_sim_dmm() as meter:
        factory = instruments.dmm(meter.path)
        slot = SlotInfo(index=2, port="/dev/ttyUNUSED", station="bench")
        async with factory(slot) as dmm:
            assert isinstance(dmm, Dmm)
            assert (await dmm.identify()).serial == meter.serial
        async with factory(slot) as dmm:
            assert await dmm.measure_voltage() == pytest.approx(3.3, abs=1e-3)


def test_meter_serial_is_deterministic_per_seed():
    a, b, c = SimDmm(seed=1), SimDmm(seed=1), SimDmm(seed=2)
    try:
        assert a.serial == b.serial != c.serial
    finally:
        for meter in (a, b, c):
            meter.close()
