"""OpenHTF's examples/with_plugs.py as a sequencer product: one phase declared once, used for three hosts.

The fixtures (OpenHTF's plugs) take their settings from the station file
(``[fixtures.dns_a] address = "8.8.8.8"``), and under ``--sim`` answer as a
simulated host would: ``sequencer run with_plugs.py --sim 1``. What a pinger
logs (OpenHTF's plug ``print``) is in the record, in the phase that pinged.
"""

from contextlib import asynccontextmanager

import trio

from sequencer import Measurement, Product, phase


class Pinger:
    def __init__(self, address, slot):
        self.address, self.simulated, self.log = address, slot.simulated, slot.log

    async def ping(self, count):
        self.log.info(f"running: ping -c {count} {self.address}")
        if not self.simulated:
            raise OSError(f"no route to {self.address} from a bench without a network")
        await trio.sleep(0.01 * count)
        return 0


def pinger(default_address):
    @asynccontextmanager
    async def open_pinger(slot, *, address=default_address):
        yield Pinger(address, slot)

    return open_pinger


@phase(name="ping_{pinger}_{count}", measurements=[Measurement("retcode").equals(0)], timeout=5)
async def test_ping(ctx, pinger, count):
    """Ping a host ``count`` times."""
    ctx.measurements.retcode = await pinger.ping(count)


hosts = {"google": "google.com", "dns_a": "8.8.8.8", "dns_b": "8.8.4.4"}
product = Product(
    "with-plugs",
    [test_ping.with_fixtures(pinger=name).with_args(count=2) for name in hosts],
    fixtures={name: pinger(address) for name, address in hosts.items()},
    sequential=True,
)
