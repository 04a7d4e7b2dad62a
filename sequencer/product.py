"""Products: a phase graph, the fixtures it needs, and the limits it is judged by.

A product file is ordinary Python that defines ``product = Product(...)``.
:func:`load_product` imports it, applies the limits file beside it and checks
the graph, so every mistake an author can make is reported once, at load, as
one line naming the file and the phase, before any DUT is touched.
"""

from __future__ import annotations

import functools
import hashlib
import os
import importlib.util
import re
import sys
import tomllib
import traceback
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import attrs

from sequencer.fixtures import FixtureFactory
from sequencer.measurements import Equals, InRange, Matches, Measurement, OneOf
from sequencer.group import PhaseGroup
from sequencer.phase import Phase, unfilled
from sequencer.plan import GraphError, Plan, compile_plan
from sequencer.provenance import ProductCode, import_base, modules_since, product_code
from sequencer.records import SourceFile
from sequencer.records import DEFAULT_IDENTITY


class ProductError(Exception):
    """A product file, its graph or its limits are not usable. The message is one line."""


def _resource_map(value: Mapping[str, str | None] | Iterable[str]) -> dict[str, str | None]:
    if isinstance(value, Mapping):
        return dict(value)
    return {name: None for name in value}


def _names(value: str | Iterable[str]) -> tuple[str, ...]:
    # A lone name is one name, not its letters (identity="serial").
    return (value,) if isinstance(value, str) else tuple(value)


@attrs.frozen
class Product:
    """What a station runs on every DUT.

    ``phases`` lists the phases, groups of phases (:class:`~sequencer.group.PhaseGroup`)
    and the product's teardowns (``teardown=True``); ``fixtures`` maps a
    parameter name to the factory that builds it per slot; ``resources``
    names the shared station instruments the product uses. ``sequential``:
    the list is the order, each phase following the one before whatever its
    outcome (OpenHTF's flow); otherwise phases run as their ``after`` and
    ``follows`` say, independent ones at once.
    """

    name: str
    phases: tuple[Phase | PhaseGroup, ...] = attrs.field(converter=tuple)
    version: str = ""
    description: str = ""
    fixtures: Mapping[str, FixtureFactory] = attrs.field(factory=dict, converter=dict)
    #: shared station resources by name, each with the instrument kind it must
    #: be (e.g. ``{"dmm": "scpi-dmm"}``), or None for a plain lock
    resources: Mapping[str, str | None] = attrs.field(factory=dict, converter=_resource_map)
    stop_on_failure: bool = False
    #: the ``dut`` keys that name one physical unit, most trusted first: runs that
    #: share any of them (and disagree on none) are the same unit in yields, retest
    #: counts, ``find`` and MongoDB's ``devices``. A board whose identify phase failed
    #: still has the MAC that ``detect`` read, so its retest is recognised.
    identity: tuple[str, ...] = attrs.field(default=DEFAULT_IDENTITY, converter=_names)
    #: how many times a unit may be tested again after its first test (None: no limit). A unit
    #: past it is sent to rework untested, with the reason; a unit whose last allowed test
    #: fails goes to rework rather than back to the retest bin (sequencer/verdicts.py)
    max_retests: int | None = None
    sequential: bool = False
    #: a regular expression the whole of every serial of this product matches: what a scanned label
    #: must be before the station binds it to a board (sequencer/scans.py)
    serial_pattern: str | None = None

    @functools.cached_property
    def all_phases(self) -> tuple[Phase, ...]:
        """Every phase, groups' included, in the order of the list (a group's setup, main, teardown)."""
        return tuple(p for item in self.phases
                     for p in (item.phases() if isinstance(item, PhaseGroup) else (item,)))

    @functools.cached_property
    def teardowns(self) -> tuple[Phase, ...]:
        """The product's own teardowns: they run after everything else, in order."""
        return tuple(p for p in self.phases if isinstance(p, Phase) and p.teardown)

    @functools.cached_property
    def main_phases(self) -> tuple[Phase, ...]:
        """Every phase but the product's own teardowns (groups' teardowns are in the graph)."""
        own = set(self.teardowns)
        return tuple(p for p in self.all_phases if p not in own)

    @functools.cached_property
    def plan(self) -> Plan:
        """The schedule (sequencer/plan.py), worked out once: every slot's scheduler reads it.

        Raises :class:`~sequencer.plan.GraphError` for a graph that is not one;
        :func:`validate_product` says so with the file's name.
        """
        return compile_plan(self.phases, sequential=self.sequential)

    @functools.cached_property
    def rendezvous(self) -> Mapping[str, str]:
        """Each rendezvous name and its phase (``@phase(rendezvous=...)``); empty for most products."""
        return {p.rendezvous: p.name for p in self.main_phases if p.rendezvous is not None}

    @functools.cached_property
    def rendezvous_after(self) -> Mapping[str, tuple[str, ...]]:
        """For each main phase, the rendezvous that come after it: a slot whose phase did not pass will not get there.

        Worked out once per product; empty when the product has no rendezvous.
        """
        if not self.rendezvous:
            return {}
        after = {p.name: p.after for p in self.main_phases}

        def ancestors(name: str, seen: set[str]) -> set[str]:
            for dep in after.get(name, ()):
                if dep not in seen:
                    seen.add(dep)
                    ancestors(dep, seen)
            return seen

        found: dict[str, list[str]] = {}
        for point, phase_name in self.rendezvous.items():
            for ancestor in ancestors(phase_name, set()):
                found.setdefault(ancestor, []).append(point)
        return {name: tuple(points) for name, points in found.items()}

    @functools.cached_property
    def declared(self) -> Mapping[str, Phase]:
        """Every phase by name (what a verdict reads a failed phase's ``on_fail`` from)."""
        return {p.name: p for p in self.phases}

    def uses(self, parameter: str) -> bool:
        """Whether any phase names ``parameter``: a fixture (``modem``) or a built-in (``operator``)."""
        return any(parameter in p.needs for p in self.all_phases)

    def phase(self, name: str) -> Phase:
        for p in self.all_phases:
            if p.name == name:
                return p
        raise KeyError(name)

    def replacing(self, replaced: Mapping[str, Phase]) -> Product:
        """This product with the phases named in ``replaced`` swapped, wherever they stand (groups too)."""
        new = dict(replaced)
        items = [item.replacing(new) if isinstance(item, PhaseGroup) else new.get(item.name, item)
                 for item in self.phases]
        return attrs.evolve(self, phases=items)


@attrs.frozen
class LoadedProduct:
    """A product as a station runs it: limits applied, provenance kept for the record."""

    product: Product
    source: Path
    limits_file: Path | None = None
    limits_sha256: str | None = None
    #: the product file and the modules it imports from its own folder, as imported (sequencer/provenance.py)
    code: ProductCode | None = None

    @property
    def name(self) -> str:
        return self.product.name

    @property
    def source_sha256(self) -> str | None:
        """The hash of the product's code stamped on every run (its file's, when it is one file)."""
        return self.code.sha256 if self.code is not None else None

    @property
    def source_files(self) -> tuple[SourceFile, ...]:
        return self.code.files if self.code is not None else ()


def load_product(
    path: str | Path,
    *,
    limits: str | Path | None = None,
    station_fixtures: Iterable[str] = (),
    station_resources: Iterable[str] | None = None,
) -> LoadedProduct:
    """Import a product file, apply its limits and validate the whole graph.

    ``limits`` defaults to ``<product stem>.limits.toml`` beside the product
    file when that file exists. ``station_resources`` is checked only when
    given (``sequencer check`` without a station cannot know them).
    """
    source = Path(path)
    product, code = _import_product(source)
    limits_path = Path(limits) if limits is not None else source.with_name(f"{source.stem}.limits.toml")
    digest = None
    if limits is not None or limits_path.exists():
        product, digest = apply_limits_file(product, limits_path)
    else:
        limits_path = None
    validate_product(product, source=source, station_fixtures=station_fixtures, station_resources=station_resources)
    return LoadedProduct(product, source, limits_path, digest, code)


def _import_product(source: Path) -> tuple[Product, ProductCode]:
    if not source.is_file():
        raise ProductError(f"{source}: no such product file")
    module_name = f"sequencer_product_{hashlib.sha1(os.fsencode(source.resolve())).hexdigest()[:12]}"
    spec = importlib.util.spec_from_file_location(module_name, source)
    if spec is None or spec.loader is None:
        raise ProductError(f"{source}: not a Python file")
    module = importlib.util.module_from_spec(spec)
    # As `python board.py` would: the product imports the modules beside it (its fixtures, its helpers).
    base = str(import_base(source))
    if base not in sys.path:
        sys.path.insert(0, base)
    before = set(sys.modules)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except SyntaxError as exc:
        sys.modules.pop(module_name, None)
        raise ProductError(f"{source}:{exc.lineno}: syntax error: {exc.msg}") from None
    except Exception as exc:
        sys.modules.pop(module_name, None)
        line = _line_in(source, exc)
        raise ProductError(f"{source}{line}: does not import: {type(exc).__name__}: {exc}") from None
    product = getattr(module, "product", None)
    if not isinstance(product, Product):
        raise ProductError(f"{source}: defines no `product = Product(...)`")
    try:
        code = product_code(source, modules_since(before))
    except OSError as exc:
        raise ProductError(f"{source}: cannot read the product's code: {exc}") from None
    return product, code


def _line_in(source: Path, exc: BaseException) -> str:
    for frame in reversed(traceback.extract_tb(exc.__traceback__)):
        if Path(frame.filename).resolve() == source.resolve():
            return f":{frame.lineno}"
    return ""


def validate_product(
    product: Product,
    *,
    source: Path | str = "<product>",
    station_fixtures: Iterable[str] = (),
    station_resources: Iterable[str] | None = None,
) -> None:
    """Raise :class:`ProductError` for the first thing wrong with the graph."""
    where = str(source)
    if not product.phases:
        raise ProductError(f"{where}: product {product.name!r} has no phases")
    for option in ("stop_on_failure", "sequential"):
        if not isinstance(getattr(product, option), bool):
            raise ProductError(f"{where}: product {product.name!r}: {option} must be True or False, "
                               f"got {getattr(product, option)!r}")
    if not product.identity or not all(isinstance(k, str) and k for k in product.identity) \
            or len(set(product.identity)) != len(product.identity):
        raise ProductError(f"{where}: product {product.name!r}: identity must name distinct dut keys, most trusted "
                           f"first (e.g. identity=(\"serial\", \"mac\")), got {product.identity!r}")
    if product.max_retests is not None and (isinstance(product.max_retests, bool)
                                            or not isinstance(product.max_retests, int) or product.max_retests < 0):
        raise ProductError(f"{where}: product {product.name!r}: max_retests must be a whole number >= 0 (or None: "
                           f"no limit), got {product.max_retests!r}")
    if product.serial_pattern is not None:
        try:
            re.compile(product.serial_pattern)
        except (re.error, TypeError) as exc:
            raise ProductError(f"{where}: product {product.name!r}: serial_pattern {product.serial_pattern!r} is not "
                               f"a regular expression: {exc}") from None
    for name, factory in product.fixtures.items():
        if not isinstance(name, str) or not callable(factory):
            raise ProductError(f"{where}: product {product.name!r}: fixture {name!r} must be a factory (a function "
                               f"of the slot that returns an async context manager), got {factory!r}")
    for name, kind in product.resources.items():
        if not isinstance(name, str) or not (kind is None or isinstance(kind, str)):
            raise ProductError(f"{where}: product {product.name!r}: resources are instrument names (and kinds), "
                               f"got {name!r}: {kind!r}")
    for item in product.phases:
        if not isinstance(item, (Phase, PhaseGroup)):
            raise ProductError(f"{where}: {item!r} is not a phase (decorate it with @phase) nor a PhaseGroup")
    try:
        product.plan
    except GraphError as exc:
        raise ProductError(f"{where}: {exc}") from None
    meeting_at: dict[str, str] = {}
    for p in product.all_phases:
        if p.rendezvous is not None:
            if p.rendezvous in meeting_at:
                raise ProductError(f"{where}: phase {p.name!r}: rendezvous {p.rendezvous!r} is phase "
                                   f"{meeting_at[p.rendezvous]!r}'s already; give each meeting its own name")
            meeting_at[p.rendezvous] = p.name
    for p in product.all_phases:
        left = unfilled(p.name)
        if left:
            raise ProductError(f"{where}: phase {p.name!r}: its name has fields nothing filled ({', '.join(left)}): "
                               "give them with .with_args(...) or .with_fixtures(...)")
    provided = set(product.fixtures) | set(station_fixtures)
    for p in product.all_phases:
        for fixture in p.fixtures:
            if fixture not in provided:
                offer = ", ".join(sorted(provided)) or "none"
                parametrised = bool(p.arguments or p.name_template)  # used with with_args: a value was meant
                hint = (f"; or give the parameter a value with .with_args({fixture}=...)"
                        if parametrised and fixture in p.parameters and fixture not in p.fixture_names else "")
                raise ProductError(
                    f"{where}: phase {p.name!r}: needs fixture {fixture!r}, which neither the product nor the "
                    f"station provides (available: {offer}){hint}"
                )
    if station_resources is not None:
        available = set(station_resources)
        for r in product.resources:
            if r not in available:
                raise ProductError(
                    f"{where}: product {product.name!r} needs station resource {r!r}, which the station does not declare"
                )


def layers(product: Product) -> list[list[str]]:
    """The product's phases by depth (its teardowns aside): layer k holds phases whose longest chain of
    waits has length k; phases in one layer can run concurrently. The graph must be valid."""
    return product.plan.layers()


_LIMIT_KEYS = ("low", "high", "marginal_low", "marginal_high")


def apply_limits_file(product: Product, path: Path) -> tuple[Product, str]:
    """Override ``in_range`` limits from a TOML file; returns the product and the file's SHA-256.

    The file has one table per phase and one inline table per measurement::

        [rails]
        vdd_3v3 = { low = 3.2, high = 3.4, marginal_low = 3.25, marginal_high = 3.35 }

    Keys not given keep the declared value. Unknown phases, measurements or
    keys are errors: a typo in a limits file must not silently keep old limits.
    """
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ProductError(f"{path}: cannot read limits file: {exc.strerror}") from None
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise ProductError(f"{path}: limits file is not UTF-8 text") from None
    except tomllib.TOMLDecodeError as exc:
        raise ProductError(f"{path}: bad TOML: {exc}") from None
    by_name = {p.name: p for p in product.all_phases}
    replaced: dict[str, Phase] = {}
    for phase_name, table in data.items():
        if phase_name not in by_name:
            raise ProductError(f"{path}: [{phase_name}]: product {product.name!r} has no such phase")
        if not isinstance(table, dict):
            raise ProductError(f"{path}: {phase_name}: expected a table of measurements")
        ph = by_name[phase_name]
        new_measurements = list(ph.measurements)
        for m_name, limits in table.items():
            where = f"{path}: [{phase_name}] {m_name}"
            index = next((i for i, m in enumerate(new_measurements) if m.name == m_name), None)
            if index is None:
                raise ProductError(f"{where}: phase {phase_name!r} declares no such measurement")
            if not isinstance(limits, dict):
                raise ProductError(f"{where}: expected an inline table such as {{ low = 1.0, high = 2.0 }}")
            unknown = set(limits) - set(_LIMIT_KEYS)
            if unknown:
                raise ProductError(f"{where}: unknown key {sorted(unknown)[0]!r} (allowed: {', '.join(_LIMIT_KEYS)})")
            for k, v in limits.items():
                if isinstance(v, bool) or not isinstance(v, (int, float)):
                    raise ProductError(f"{where}: {k} must be a number, got {v!r}")
            text = next((v for v in new_measurements[index].validators if isinstance(v, (Equals, OneOf, Matches))),
                        None)
            if text is not None:
                # A range beside equals/one_of/matches would fail every DUT ("'1.0' is not a number").
                raise ProductError(f"{where}: the measurement is judged by {type(text).__name__.lower()}, not a "
                                   "range; a limits file sets in_range limits only")
            try:
                new_measurements[index] = _override(new_measurements[index], limits)
            except (ValueError, OverflowError) as exc:
                raise ProductError(f"{where}: {exc}") from None
        replaced[phase_name] = ph.with_measurements(new_measurements)
    return product.replacing(replaced), hashlib.sha256(raw).hexdigest()


def _override(m: Measurement, limits: Mapping[str, Any]) -> Measurement:
    index = next((i for i, v in enumerate(m.validators) if isinstance(v, InRange)), None)
    base = m.validators[index] if index is not None else InRange(low=limits.get("low"), high=limits.get("high"))
    assert isinstance(base, InRange)
    new = attrs.evolve(base, **{k: float(v) for k, v in limits.items()})  # validates low <= high etc.
    validators = list(m.validators)
    if index is None:
        validators.append(new)
    else:
        validators[index] = new
    return attrs.evolve(m, validators=tuple(validators))
