"""Plain-language verdicts and retest awareness: what the operator is told, and how a station knows a unit."""

from __future__ import annotations

from pathlib import Path

import attrs
import pytest
import trio
from rich.console import Console

from reports.storage.store import LocalStore
from sequencer import Measurement, Product, phase
from sequencer.display import StationDisplay, station_summary
from sequencer.events import EventBus, RunFinished, UnitRecognised
from sequencer.product import ProductError, validate_product
from sequencer.records import Disposition, MeasurementOutcome, Outcome
from sequencer.verdicts import UnitHistory, failure_where, quantity, unit_label, verdict_of
from tests.conftest import outcomes, run_product
from tests.records_factory import sensor_run


class Unit:
    """What the simulated unit in a slot reports: its identity and its 3.3 V rail."""

    def __init__(self, serial: str = "SN100000001", mac: str = "24:0A:C4:00:00:01", vdd: float = 3.3,
                 serial_readable: bool = True) -> None:
        self.serial, self.mac, self.vdd, self.serial_readable = serial, mac, vdd, serial_readable


def rails_product(unit: Unit, **product_options: object) -> Product:
    """detect (MAC) -> identify (serial) -> rails (judged) -> sensor: the shape of a real board test."""

    @phase
    async def detect(ctx) -> None:
        ctx.identify(mac=unit.mac)

    @phase(after=[detect])
    async def identify(ctx) -> None:
        if not unit.serial_readable:
            raise OSError("the label's serial could not be read")
        ctx.identify(serial=unit.serial)

    @phase(after=[identify], on_fail="Check the 3.3 V regulator", disposition="rework",
           measurements=[Measurement("vdd_3v3", units="V").in_range(3.2, 3.4),
                         Measurement("vdd_5v0", units="V", on_fail="Reseat the USB cable and retest",
                                     disposition="retest").in_range(4.75, 5.25)])
    async def rails(ctx) -> None:
        ctx.measurements.vdd_3v3 = unit.vdd
        ctx.measurements.vdd_5v0 = 5.0 if unit.vdd < 4 else 0.2

    @phase(after=[rails])
    async def sensor() -> None:
        pass

    return Product("board", [detect, identify, rails, sensor], **product_options)  # type: ignore[arg-type]


# -- what the product says, at declaration ------------------------------------------------------


def test_a_bin_that_does_not_exist_is_refused_naming_the_phase_or_measurement() -> None:
    async def f() -> None:
        pass

    with pytest.raises(ValueError, match=r"phase 'f': disposition must be one of retest, rework, scrap, got 'bin'"):
        phase(f, disposition="bin")
    with pytest.raises(TypeError, match=r"phase 'f': on_fail must be text"):
        phase(f, on_fail=3)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"measurement 'vdd': disposition must be one of"):
        Measurement("vdd", disposition="recycle")
    with pytest.raises(TypeError, match=r"measurement 'vdd': on_fail must be text"):
        Measurement("vdd", on_fail=None)  # type: ignore[arg-type]
    assert phase(f, disposition="scrap").disposition is Disposition.SCRAP
    assert phase(f, on_fail="x").configured(timeout=2).on_fail == "x"  # kept through configured()
    for bad in (-1, 1.5, True, "2"):
        with pytest.raises(ProductError, match=r"max_retests must be a whole number >= 0"):
            validate_product(Product("p", [phase(f)], max_retests=bad))  # type: ignore[arg-type]


# -- the words and the bin ----------------------------------------------------------------------


async def test_a_failed_measurements_own_words_win_over_its_phases(store_path: Path) -> None:
    [high_3v3] = await run_product(rails_product(Unit(vdd=3.59)), store_path)
    assert high_3v3.outcome is Outcome.FAIL
    assert (high_3v3.disposition, high_3v3.instruction) == (Disposition.REWORK, "Check the 3.3 V regulator")
    verdict = verdict_of(high_3v3)
    assert (verdict.headline, verdict.where) == ("REWORK", "rails, vdd_3v3 3.59 V > 3.4 V")

    [usb] = await run_product(rails_product(Unit(vdd=4.5)), store_path)  # both rails out: the first failed one
    assert usb.phase("rails").measurements[0].outcome is MeasurementOutcome.FAIL
    assert (usb.disposition, usb.instruction) == (Disposition.REWORK, "Check the 3.3 V regulator")

    @phase(measurements=[Measurement("v", units="V", on_fail="Reseat the USB cable and retest",
                                     disposition="retest").in_range(4.75, 5.25)])
    async def usb_only(ctx) -> None:
        ctx.measurements.v = 0.2

    [reseat] = await run_product(Product("p", [usb_only]), store_path)
    assert (reseat.disposition, reseat.instruction) == (Disposition.RETEST, "Reseat the USB cable and retest")
    assert verdict_of(reseat).where == "usb_only, v 200 mV < 4.75 V"


async def test_an_undeclared_failure_goes_to_the_retest_bin_and_station_trouble_to_the_engineer(
    store_path: Path,
) -> None:
    @phase(measurements=[Measurement("n").equals(1)])
    async def judged(ctx) -> None:
        ctx.measurements.n = 2

    @phase(timeout=0.05, on_fail="never read: this phase does not fail, it times out")
    async def hangs() -> None:
        await trio.sleep_forever()

    [bad, trouble] = [(await run_product(Product("p", [p]), store_path))[0] for p in (judged, hangs)]
    assert (bad.disposition, verdict_of(bad).headline) == (Disposition.RETEST, "RETEST")
    assert bad.instruction == "Put it in the retest bin and test it again"
    assert trouble.outcome is Outcome.TIMEOUT and trouble.disposition is None
    verdict = verdict_of(trouble)
    assert verdict.headline == "CALL ENGINEER" and "Station trouble, not a bad unit" in verdict.instruction
    assert verdict.where == "hangs: timed out after 0.05 s"


def test_where_a_unit_failed_reads_as_values_against_limits() -> None:
    assert quantity(3.59, "V") == "3.59 V" and quantity(31e-6, "A") == "31 µA" and quantity(0.5, None) == "0.5"
    run = sensor_run(vdd=3.59)
    assert failure_where(run) == "power_rails, vdd_3v3 3.59 V > 3.4 V"
    curve = sensor_run(fail_rf=True)
    assert failure_where(curve) == "rf_sweep, rssi_sweep: -28.5 is above -30"  # a curve: the validator's words
    assert failure_where(sensor_run()) == ""


def test_a_unit_is_shown_by_its_mac_until_its_serial_is_read() -> None:
    assert unit_label({"mac": "24:0A:C4:00:00:01"}) == "mac 24:0A:C4:00:00:01"
    assert unit_label({"mac": "24:0A:C4:00:00:01", "serial": "SN1"}) == "SN1"
    assert unit_label({"chip": "ESP32"}) == ""


# -- retests ------------------------------------------------------------------------------------


async def _recognised(product: Product, store_path: Path) -> tuple[object, list[UnitHistory]]:
    bus = EventBus()
    events = bus.subscribe("test", buffer=1000)
    [run] = await run_product(product, store_path, bus=bus, history=True)
    bus.close()
    seen = [e.history async for e in events if isinstance(e, UnitRecognised)]
    return run, seen


async def test_a_unit_tested_before_is_recognised_by_serial_or_mac_with_its_last_failure(store_path: Path) -> None:
    unit = Unit(vdd=3.59)
    first, seen = await _recognised(rails_product(unit), store_path)
    # Looked up by MAC at detect, then by serial and MAC at identify (which supersedes the first if it is quicker).
    assert [h.tests for h in seen] in ([0], [0, 0])
    second, seen = await _recognised(rails_product(unit), store_path)
    assert seen[-1].line() == "retest 1: last FAIL at rails, vdd_3v3 3.59 V > 3.4 V"
    # A board whose serial could not be read is still the same unit, by its MAC ...
    unit.serial_readable = False
    third, seen = await _recognised(rails_product(unit), store_path)
    assert third.outcome is Outcome.ERROR and seen[-1].tests == 2
    assert unit_label(third.dut) == "mac 24:0A:C4:00:00:01"
    # ... and counts as a test of the unit with that MAC and a serial.
    unit.serial_readable, unit.vdd = True, 3.3
    fourth, seen = await _recognised(rails_product(unit), store_path)
    assert seen[-1].line() == "retest 3: last ERROR at identify: OSError: the label's serial could not be read"
    assert fourth.outcome is Outcome.PASS
    # Another serial with this MAC is another unit (a label on the wrong board), never this one's retest.
    _, seen = await _recognised(rails_product(Unit(serial="SN999", vdd=3.3)), store_path)
    assert seen[-1].tests == 0
    # Another product's runs of the same board are not retests of this product.
    other = attrs.evolve(rails_product(Unit(serial="SN100000001")), name="final-test")
    _, seen = await _recognised(other, store_path)
    assert [h.tests for h in seen] in ([0], [0, 0])


async def test_past_max_retests_a_unit_goes_to_rework_untested(store_path: Path) -> None:
    unit = Unit(vdd=5.0)  # both rails fail; vdd_5v0 alone would say retest: here the phase says rework...
    unit.vdd = 3.3

    @phase(measurements=[Measurement("contact").equals(True)])
    async def pogo(ctx) -> None:
        ctx.measurements.contact = False  # a bad contact: retest bin by default

    def product() -> Product:
        base = rails_product(unit, max_retests=1)
        return attrs.evolve(base, phases=(*base.phases, pogo.depends_on("identify")))

    first, _ = await _recognised(product(), store_path)
    assert (first.outcome, first.disposition) == (Outcome.FAIL, Disposition.RETEST)
    second, _ = await _recognised(product(), store_path)  # retest 1, the last allowed: fails again
    assert second.disposition is Disposition.REWORK
    assert "That was its last allowed test (max 1 retest): put it in the rework bin" in second.instruction
    third, seen = await _recognised(product(), store_path)
    assert seen[-1].tests == 2
    assert outcomes(third) == {"detect": "PASS", "identify": "SKIPPED", "rails": "SKIPPED", "sensor": "SKIPPED",
                               "pogo": "SKIPPED"}  # refused at detect, by its MAC: nothing else touched it
    assert third.outcome is Outcome.FAIL and third.disposition is Disposition.REWORK
    assert third.instruction.startswith("Retest limit reached: tested 2 times before (max 1 retest); put it in the "
                                        "rework bin untested (last FAIL at pogo, contact: False is not True)")
    assert third.phase("identify").reason == f"run stopped: {third.instruction}"
    assert verdict_of(third).headline == "REWORK"


async def test_a_station_without_a_store_to_ask_tests_every_unit_as_new(store_path: Path) -> None:
    class Broken:
        async def history(self, *args: object, **kwargs: object) -> UnitHistory:
            raise OSError("disk gone")

    store = LocalStore.open(store_path, station=True)
    try:
        from sequencer.engine import RunSettings, run_dut
        from sequencer.fixtures import SlotInfo
        from sequencer.product import LoadedProduct

        async with store.writer():
            run = await run_dut(LoadedProduct(rails_product(Unit(), max_retests=0), Path("<t>")),
                                SlotInfo(0, "/dev/x", "st"), settings=RunSettings("st"), store=store, bus=EventBus(),
                                history=Broken())
    finally:
        store.close()
    assert run.outcome is Outcome.PASS


# -- what the operator sees ---------------------------------------------------------------------


async def test_the_display_says_retest_while_it_runs_and_what_to_do_when_it_ends(store_path: Path) -> None:
    unit = Unit(vdd=3.59)
    await run_product(rails_product(unit), store_path)
    bus = EventBus()
    events = bus.subscribe("display", buffer=1000)
    [run] = await run_product(rails_product(unit), store_path, bus=bus, history=True)
    bus.close()
    display = StationDisplay(["/dev/sim0"], phases_per_run=4)
    lines = []
    async for event in events:
        if isinstance(event, RunFinished):
            console = Console(width=120, height=30, record=True, color_system=None)
            console.print(display.render(120, 30))
            running = console.export_text()
        if (line := display.apply(event)) is not None:
            lines.append(line)
    assert "retest 1" in running and "slot 0 SN100000001: retest 1: last FAIL at rails, vdd_3v3 3.59 V > 3.4 V" in running
    assert lines.count("slot 0 /dev/sim0 SN100000001: retest 1: last FAIL at rails, vdd_3v3 3.59 V > 3.4 V") == 1
    assert lines[-1] == ("slot 0 /dev/sim0 SN100000001: FAIL\n  → REWORK: Check the 3.3 V regulator "
                         "(rails, vdd_3v3 3.59 V > 3.4 V)")  # the run's line as log readers know it, then what to do
    console = Console(width=120, height=30, record=True, color_system=None)
    console.print(display.render(120, 30))
    done = console.export_text()
    assert " REWORK " in done and "slot 0 SN100000001:  REWORK  Check the 3.3 V regulator  (rails, vdd_3v3 3.59 V" in done
    assert "retest 1" not in done  # once it ended, what to do replaces the retest note
    console = Console(width=120, record=True, color_system=None)
    console.print(station_summary([run]))
    summary = console.export_text()
    assert "FAIL → REWORK" in summary and "REWORK: Check the 3.3 V regulator" in summary
