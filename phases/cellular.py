"""Cellular identity: read the module's IMEI and the SIM's IMSI and ICCID, pick the APN.

The phase asks for the ``modem`` fixture (an :class:`~fixtures.modem.AtModem`
on the slot's modem port, see :func:`fixtures.modem.at_modem`) and stamps
``imei``, ``imsi``, ``iccid`` and ``apn`` on the DUT identity, so the record
ties the unit to its radio and subscription.

The APN comes from a table shared by every product (``products/data/apn.toml``):
IMSI prefixes -- the SIM's home network, MCC+MNC, or a longer prefix for an
MVNO that owns part of its host's IMSI range -- each with the APN (and any
credentials) a device on that SIM must use. The longest matching prefix wins.
A product wires the phase up::

    from phases import cellular
    identity = cellular.cellular_identity.depends_on(boot)                    # the shared table
    identity = cellular.cellular_identity_phase("data/apn.toml").depends_on(boot)  # its own

Verdicts: an IMEI that is not 15 digits with a valid Luhn check digit, a
missing or unusable SIM (``SIM not inserted (+CME ERROR: 10)``), or an IMSI
whose network has no APN in the table FAIL the phase; a module that refuses
an identification command or stops answering ends it in ERROR, quoting the
port and the command.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import attrs

from fixtures.modem import ModemError
from sequencer import Measurement, phase
from sequencer.measurements import Verdict
from sequencer.phase import Phase

__all__ = [
    "DEFAULT_APN_TABLE",
    "ApnEntry",
    "ApnTable",
    "ApnTableError",
    "cellular_identity",
    "cellular_identity_phase",
    "is_valid_imei",
    "load_apn_table",
    "luhn_valid",
    "parse_apn_table",
]

#: The table every product shares unless it passes its own.
DEFAULT_APN_TABLE = Path(__file__).resolve().parent.parent / "products" / "data" / "apn.toml"

#: A prefix is at least MCC+MNC (5 digits) and at most a whole IMSI (15).
MIN_PREFIX, MAX_PREFIX = 5, 15

# 3GPP TS 23.003 section 9.1: an APN network identifier is dot-separated
# labels of letters, digits and inner hyphens, at most 63 octets.
_APN = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)*")
_APN_MAX = 63
_ENTRY_KEYS = ("prefix", "apn", "username", "password", "operator")


def luhn_valid(number: str) -> bool:
    """Whether *number* (digits) ends in a correct Luhn check digit (ISO/IEC 7812-1)."""
    if not isinstance(number, str) or not number.isascii() or not number.isdigit():
        return False
    total = 0
    for position, char in enumerate(reversed(number)):
        digit = int(char)
        if position % 2 == 1:
            digit = digit * 2 - 9 if digit > 4 else digit * 2
        total += digit
    return total % 10 == 0


def is_valid_imei(value: Any) -> bool:
    """15 digits (TAC, serial, check digit) with a valid Luhn check digit."""
    return isinstance(value, str) and len(value) == 15 and luhn_valid(value)


# ------------------------------------------------------------------ APN table


class ApnTableError(Exception):
    """The APN table is not usable; the message is one line naming the file and the entry."""


@attrs.frozen
class ApnEntry:
    """The APN for SIMs whose IMSI starts with :attr:`prefix`."""

    prefix: str
    apn: str
    username: str | None = None
    password: str | None = attrs.field(default=None, repr=False)
    #: who runs the network, for people reading the table
    operator: str = ""


def _index(entries: tuple[ApnEntry, ...]) -> dict[str, ApnEntry]:
    index: dict[str, ApnEntry] = {}
    for entry in entries:
        if not (entry.prefix.isascii() and entry.prefix.isdigit() and MIN_PREFIX <= len(entry.prefix) <= MAX_PREFIX):
            raise ValueError(f"prefix {entry.prefix!r} must be {MIN_PREFIX} to {MAX_PREFIX} digits")
        if entry.prefix in index:
            raise ValueError(f"prefix {entry.prefix!r} is listed twice")
        index[entry.prefix] = entry
    return index


@attrs.frozen
class ApnTable:
    """IMSI prefixes and their APNs; :meth:`lookup` finds the longest prefix of an IMSI."""

    entries: tuple[ApnEntry, ...] = attrs.field(converter=tuple)
    #: where the table came from, for messages
    source: str = "<apn table>"
    _by_prefix: Mapping[str, ApnEntry] = attrs.field(init=False, repr=False, eq=False)

    def __attrs_post_init__(self) -> None:
        object.__setattr__(self, "_by_prefix", _index(self.entries))

    def lookup(self, imsi: str) -> ApnEntry | None:
        """The entry with the longest prefix of *imsi*, or None if no prefix matches."""
        if not (isinstance(imsi, str) and imsi.isascii() and imsi.isdigit()):
            raise ValueError(f"an IMSI is digits, not {imsi!r}")
        for length in range(min(len(imsi), MAX_PREFIX), MIN_PREFIX - 1, -1):
            entry = self._by_prefix.get(imsi[:length])
            if entry is not None:
                return entry
        return None

    def __len__(self) -> int:
        return len(self.entries)


def _entry(path: str, number: int, raw: Any, seen: Mapping[str, int]) -> ApnEntry:
    if not isinstance(raw, dict):
        raise ApnTableError(f"{path}: network entry {number}: must be a table ([[network]])")
    prefix = raw.get("prefix")
    where = f"{path}: network entry {number}" + (f" (prefix {prefix!r})" if isinstance(prefix, str) else "")
    if unknown := sorted(set(raw) - set(_ENTRY_KEYS)):
        raise ApnTableError(f"{where}: unknown key {unknown[0]!r} (keys: {', '.join(_ENTRY_KEYS)})")
    if prefix is None:
        raise ApnTableError(f"{where}: missing 'prefix'")
    if not isinstance(prefix, str):
        raise ApnTableError(
            f"{where}: prefix must be a quoted string of digits, not {prefix!r} (a number drops leading zeros)"
        )
    if not (prefix.isascii() and prefix.isdigit()):
        raise ApnTableError(f"{where}: prefix must be digits only (MCC+MNC or longer)")
    if not MIN_PREFIX <= len(prefix) <= MAX_PREFIX:
        raise ApnTableError(
            f"{where}: prefix must be {MIN_PREFIX} to {MAX_PREFIX} digits (MCC+MNC or longer), not {len(prefix)}"
        )
    if prefix in seen:
        raise ApnTableError(f"{where}: duplicate prefix; network entry {seen[prefix]} has it already")
    apn = raw.get("apn")
    if apn is None:
        raise ApnTableError(f"{where}: missing 'apn'")
    if not isinstance(apn, str) or len(apn) > _APN_MAX or not _APN.fullmatch(apn):
        raise ApnTableError(
            f"{where}: apn {apn!r} is not an APN "
            f"(dot-separated labels of letters, digits and '-', at most {_APN_MAX} characters)"
        )
    for key in ("username", "password", "operator"):
        if key in raw and not isinstance(raw[key], str):
            # The value is not quoted: it may be a password written without quotes.
            raise ApnTableError(f"{where}: {key} must be a string (in quotes), not a {type(raw[key]).__name__}")
    return ApnEntry(
        prefix=prefix,
        apn=apn,
        username=raw.get("username"),
        password=raw.get("password"),
        operator=raw.get("operator", ""),
    )


def parse_apn_table(data: Mapping[str, Any], source: str = "<apn table>") -> ApnTable:
    """Validate parsed TOML; raise :class:`ApnTableError` for the first problem."""
    if unknown := sorted(set(data) - {"network"}):
        raise ApnTableError(f"{source}: unknown key {unknown[0]!r}; the table is [[network]] entries")
    networks = data.get("network")
    if not isinstance(networks, list) or not networks:
        raise ApnTableError(f"{source}: no [[network]] entries")
    seen: dict[str, int] = {}
    entries = []
    for number, raw in enumerate(networks, start=1):
        entry = _entry(source, number, raw, seen)
        seen[entry.prefix] = number
        entries.append(entry)
    return ApnTable(tuple(entries), source)


def load_apn_table(path: str | Path) -> ApnTable:
    """Read and validate an APN table file (format: ``docs/cellular.md``)."""
    source = str(path)
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as exc:
        raise ApnTableError(f"{source}: cannot read the APN table: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ApnTableError(f"{source}: not valid TOML: {exc}") from None
    return parse_apn_table(data, source)


# --------------------------------------------------------------------- phase


@attrs.frozen
class _HasApn:
    """An IMSI whose network is listed in the APN table."""

    table: ApnTable = attrs.field(eq=False, repr=False)

    @property
    def description(self) -> str:
        return f"an IMSI whose network has an APN in {Path(self.table.source).name}"

    @property
    def limits(self) -> None:
        return None

    def check(self, value: Any) -> Verdict:
        if not (isinstance(value, str) and value.isascii() and value.isdigit() and 6 <= len(value) <= 15):
            return Verdict(False, reason=f"{value!r} is not an IMSI (6 to 15 digits)")
        if self.table.lookup(value) is None:
            return Verdict(
                False,
                reason=f"no APN for IMSI {value} in {Path(self.table.source).name} (no listed prefix matches it)",
            )
        return Verdict(True)


def cellular_identity_phase(
    apn_table: ApnTable | str | Path = DEFAULT_APN_TABLE,
    *,
    name: str = "cellular_identity",
    timeout: float = 30.0,
    retries: int = 0,
    sim_timeout: float = 10.0,
) -> Phase:
    """A phase that reads IMEI, SIM status, IMSI and ICCID, and picks the APN from *apn_table*.

    The table is loaded and checked now, so a product with a broken table
    does not load. *sim_timeout* bounds the wait for a SIM that is still
    initialising (``+CME ERROR: 14``) right after power-up.
    """
    table = apn_table if isinstance(apn_table, ApnTable) else load_apn_table(apn_table)

    measurements: Iterable[Measurement] = [
        # In this order: the first failing one is the phase's reason.
        Measurement("imei").check(is_valid_imei, "15 digits with a valid Luhn check digit").doc(
            "the module's IMEI (AT+CGSN)"
        ),
        Measurement("sim_status").reported("READY").doc(
            "AT+CPIN?, or the error the module gave instead"
        ),
        Measurement("imsi").with_validator(_HasApn(table)).doc("the SIM's IMSI (AT+CIMI)"),
        Measurement("iccid").matches(r"89[0-9]{16,18}").doc("the SIM's ICCID (AT+CICCID)"),
        Measurement("apn").doc(f"APN for the IMSI's network, from {Path(table.source).name}"),
    ]

    @phase(name=name, measurements=measurements, timeout=timeout, retries=retries)
    async def cellular_identity(ctx, modem):
        """Read the module's IMEI and the SIM's IMSI and ICCID; choose the APN; stamp them on the DUT."""
        try:
            imei = await modem.imei()
            ctx.measurements.imei = imei
            ctx.identify(imei=imei)
            try:
                status = await modem.sim_status(sim_timeout)
            except ModemError as exc:
                if exc.kind != "CME":
                    raise  # a plain ERROR says nothing about the SIM
                ctx.measurements.sim_status = exc.reason
                ctx.log.error("SIM not usable", port=modem.port, error=exc.reason)
                return
            ctx.measurements.sim_status = status
            if status != "READY":
                ctx.log.error("SIM not ready", status=status)
                return
            imsi = await modem.imsi()
            ctx.measurements.imsi = imsi
            iccid = await modem.iccid()
            ctx.measurements.iccid = iccid
            ctx.identify(imsi=imsi, iccid=iccid)
            entry = table.lookup(imsi)
            if entry is None:
                ctx.log.error("no APN for the SIM's network", imsi=imsi, table=table.source)
                return
            ctx.measurements.apn = entry.apn
            ctx.identify(apn=entry.apn)
            ctx.log.info("APN chosen", apn=entry.apn, prefix=entry.prefix, operator=entry.operator)
        finally:
            if modem.urcs:
                ctx.log.info("unsolicited result codes", urcs=" | ".join(modem.urcs[-50:]))
            ctx.attach("modem.txt", modem.transcript_text(), "text/plain")

    return cellular_identity


#: The phase with the shared table, ``products/data/apn.toml``.
cellular_identity = cellular_identity_phase()
