"""The phase API: an async function plus what the engine needs to know about it.

::

    @phase(
        measurements=[Measurement("vdd_3v3", units="V").in_range(3.2, 3.4)],
        timeout=5, retries=1, after=[identify],
    )
    async def rails(ctx, dut):
        ctx.measurements.vdd_3v3 = (await dut.read_rails())["3V3"]

A phase's parameters are filled by name: ``ctx`` is its :class:`PhaseContext`
(measurements, log, attachments, DUT identity); ``resources`` the station's
shared instruments; ``slot`` the slot's :class:`~sequencer.fixtures.SlotInfo`;
``port`` the slot's port path; ``operator`` asks the person at the station
(:class:`~sequencer.operator.Operator`); any other name is a fixture the
product or the station must provide, which the product loader checks before
anything runs.

Phases run as soon as every phase they come ``after`` has passed and every
phase they ``follow`` has finished (whatever its outcome); phases with no
dependency between them run concurrently, unless the product is
``sequential``. A phase ends in a :class:`PhaseResult` (``None`` means
``CONTINUE``).
"""

from __future__ import annotations

import enum
import inspect
import math
import re
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any, TypeAlias

import attrs

from sequencer.measurements import Measurement
from sequencer.monitors import Monitor
from sequencer.records import Disposition, RunRecord, as_disposition

#: Parameter names the engine fills itself; every other parameter is a fixture.
BUILTIN_PARAMETERS = frozenset({"ctx", "resources", "slot", "port", "operator"})

#: Teardowns must end even when their author set no timeout: an operator's
#: Ctrl-C waits for them.
DEFAULT_TEARDOWN_TIMEOUT_S = 30.0
#: How long the slots at a rendezvous wait for one still on its way, from the first arrival.
DEFAULT_RENDEZVOUS_TIMEOUT_S = 600.0


class PhaseResult(enum.Enum):
    """What a phase asks of the engine when it returns."""

    #: Judge the measurements and go on (the same as returning ``None``).
    CONTINUE = "CONTINUE"
    #: Run the phase again (not counted as a retry); this attempt is recorded
    #: SKIPPED, its measurements kept but not judged. A phase runs at most
    #: ``repeat_limit`` times: asking to repeat on the last of them fails it
    #: and stops the run.
    REPEAT = "REPEAT"
    #: Record the phase as SKIPPED; what it measured stays in its record,
    #: marked SKIPPED, and decides nothing.
    SKIP = "SKIP"
    #: Judge this phase, then stop the run, which ends FAIL ("run stopped by
    #: phase X"): phases not yet started are SKIPPED, teardowns still run.
    STOP = "STOP"
    #: Fail the phase whatever its measurements say; the run goes on.
    FAIL = "FAIL"
    #: Fail the phase and stop its group (:class:`~sequencer.group.PhaseGroup`):
    #: the rest of the group's main part is SKIPPED, its teardown runs, and the
    #: run goes on after the group (OpenHTF's FAIL_SUBTEST). Outside any group
    #: the group is the whole run: it stops, as for STOP.
    FAIL_GROUP = "FAIL_GROUP"


PhaseFunction: TypeAlias = Callable[..., Awaitable[PhaseResult | None]]
RunPredicate: TypeAlias = Callable[[RunRecord], bool]


@attrs.frozen
class Phase:
    """A phase declaration. Build one with :func:`phase`."""

    fn: PhaseFunction = attrs.field(repr=False)
    name: str
    measurements: tuple[Measurement, ...] = ()
    timeout: float | None = None
    retries: int = 0
    repeat_limit: int = 10
    after: tuple[str, ...] = ()
    #: phases this one runs after, whatever their outcome
    follows: tuple[str, ...] = ()
    run_if: RunPredicate | None = attrs.field(default=None, repr=False)
    teardown: bool = False
    description: str = ""
    #: the parameters the engine fills (those with no default, and none ``with_args`` gave)
    parameters: tuple[str, ...] = ()
    #: what the operator should do with a unit this phase failed, and the bin it goes to (sequencer/verdicts.py)
    on_fail: str = ""
    disposition: Disposition | None = None
    #: every active slot reaches this phase before any starts it (sequencer/rendezvous.py)
    rendezvous: str | None = None
    rendezvous_timeout: float = DEFAULT_RENDEZVOUS_TIMEOUT_S
    #: functions sampled while the phase runs, each into a series (sequencer/monitors.py)
    monitors: tuple[Monitor, ...] = ()
    #: under --sim, what the simulated operator answers this phase's free-text questions
    sim_answer: str | None = None
    #: values ``with_args`` gave parameters, and fixtures ``with_fixtures`` put in a parameter's place
    arguments: Mapping[str, Any] = attrs.field(factory=dict, eq=False, repr=False)
    fixture_names: Mapping[str, str] = attrs.field(factory=dict, eq=False)
    #: the name as declared, ``{fields}`` and all: what ``with_args`` fills
    name_template: str = attrs.field(default="", eq=False, repr=False)
    _by_name: Mapping[str, Measurement] = attrs.field(init=False, eq=False, repr=False)
    #: (parameter, what fills it: a built-in's name or a fixture's), worked out once: every attempt reads it
    sources: tuple[tuple[str, str], ...] = attrs.field(init=False, eq=False, repr=False)

    def __attrs_post_init__(self) -> None:
        object.__setattr__(self, "_by_name", {m.name: m for m in self.measurements})
        object.__setattr__(self, "sources", tuple((p, self.fixture_names.get(p, p)) for p in self.parameters))

    @property
    def fixtures(self) -> tuple[str, ...]:
        """The fixtures this phase (and its monitors) asks for, by name."""
        wanted = [source for _, source in self.sources if source not in BUILTIN_PARAMETERS]
        wanted += [p for m in self.monitors for p in m.parameters if p not in BUILTIN_PARAMETERS]
        return tuple(dict.fromkeys(wanted))

    @property
    def needs(self) -> frozenset[str]:
        """Every fixture and built-in the phase and its monitors are given."""
        return frozenset((*(source for _, source in self.sources), *(p for m in self.monitors for p in m.parameters)))

    def with_args(self, **values: Any) -> Phase:
        """This phase with parameters given these values (OpenHTF's ``with_args``); ``{fields}`` of its name filled.

        One phase declared once serves many: ``ping.with_args(host="a", count=2)``
        with ``@phase(name="ping_{host}_{count}")`` is the phase ``ping_a_2``.
        """
        signature = inspect.signature(self.fn).parameters
        for key in values:
            if key not in signature:
                raise TypeError(f"phase {self.name!r}: with_args: it has no parameter {key!r} "
                                f"(its parameters: {', '.join(signature)})")
            if key in BUILTIN_PARAMETERS:
                raise TypeError(f"phase {self.name!r}: with_args: {key!r} is given by the engine")
        arguments = {**self.arguments, **values}
        return self._renamed(arguments=arguments, parameters=tuple(p for p in self.parameters if p not in arguments))

    def with_fixtures(self, **fixtures: str) -> Phase:
        """This phase with fixtures put in its parameters' places (OpenHTF's ``with_plugs``).

        ``measure.with_fixtures(dmm="bench_dmm")``: the parameter ``dmm`` is
        the fixture named ``bench_dmm``; ``{dmm}`` in the name is filled with it.
        """
        for key, fixture in fixtures.items():
            if key not in self.parameters or key in BUILTIN_PARAMETERS:
                raise TypeError(f"phase {self.name!r}: with_fixtures: {key!r} is not one of its fixture parameters "
                                f"({', '.join(p for p in self.parameters if p not in BUILTIN_PARAMETERS) or 'none'})")
            if not isinstance(fixture, str) or not fixture:
                raise TypeError(f"phase {self.name!r}: with_fixtures: {key}= takes a fixture's name, got {fixture!r}")
        return self._renamed(fixture_names={**self.fixture_names, **fixtures})

    def _renamed(self, **changes: Any) -> Phase:
        new = attrs.evolve(self, **changes)
        values = {**new.fixture_names, **new.arguments}
        return attrs.evolve(new, name=_fill(new.name_template or new.name, values))

    @property
    def effective_timeout(self) -> float | None:
        if self.timeout is None and self.teardown:
            return DEFAULT_TEARDOWN_TIMEOUT_S
        return self.timeout

    def measurement(self, name: str) -> Measurement | None:
        return self._by_name.get(name)

    def with_measurements(self, measurements: Iterable[Measurement]) -> Phase:
        return attrs.evolve(self, measurements=tuple(measurements))

    def depends_on(self, *phases: Phase | str) -> Phase:
        """This phase, to run after ``phases`` as well: how a product wires a reusable phase into its graph.

        Adds to the phase's own ``after``, never replaces it: a shared phase
        that needs another to have passed keeps needing it.
        """
        added = (p.name if isinstance(p, Phase) else str(p) for p in phases)
        return attrs.evolve(self, after=tuple(dict.fromkeys((*self.after, *added))))

    def configured(self, **options: Any) -> Phase:
        """This phase with other options (``timeout``, ``retries``, ``name``, ...), checked as ``@phase`` does."""
        current: dict[str, Any] = {
            "name": self.name, "measurements": self.measurements, "timeout": self.timeout, "retries": self.retries,
            "repeat_limit": self.repeat_limit, "after": self.after, "follows": self.follows, "run_if": self.run_if,
            "teardown": self.teardown, "on_fail": self.on_fail, "disposition": self.disposition,
            "rendezvous": self.rendezvous, "rendezvous_timeout": self.rendezvous_timeout,
            "monitors": self.monitors, "sim_answer": self.sim_answer,
        }
        unknown = sorted(set(options) - set(current))
        if unknown:
            raise TypeError(f"phase {self.name!r}: configured() takes {', '.join(current)}, not {', '.join(unknown)}")
        rebuilt = phase(self.fn, **{**current, **options})
        # What with_args and with_fixtures gave is kept; a new name is a new template.
        renamed = "name" in options
        return attrs.evolve(rebuilt, arguments=self.arguments, fixture_names=self.fixture_names,
                            name_template="" if renamed else self.name_template,
                            parameters=tuple(p for p in rebuilt.parameters if p not in self.arguments))

    def __str__(self) -> str:
        return self.name


_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]*")


def phase(
    fn: PhaseFunction | None = None,
    *,
    name: str | None = None,
    measurements: Iterable[Measurement] = (),
    timeout: float | None = None,
    retries: int = 0,
    repeat_limit: int = 10,
    after: Iterable[Phase | str] = (),
    follows: Iterable[Phase | str] = (),
    run_if: RunPredicate | None = None,
    teardown: bool = False,
    on_fail: str = "",
    disposition: Disposition | str | None = None,
    rendezvous: str | None = None,
    rendezvous_timeout: float = DEFAULT_RENDEZVOUS_TIMEOUT_S,
    monitors: Iterable[Monitor] = (),
    sim_answer: str | None = None,
) -> Any:
    """Declare a phase; use bare (``@phase``) or with options (``@phase(timeout=5)``).

    ``on_fail`` says, in the product's words, what the operator should do
    with a unit this phase FAILed ("Reseat the sensor cable and retest"), and
    ``disposition`` which bin it goes to (``"retest"``, ``"rework"``,
    ``"scrap"``); a failed measurement's own ``on_fail``/``disposition`` win.

    ``rendezvous="chamber"``: every active slot reaches this phase before any
    starts it, waiting at most ``rendezvous_timeout`` seconds for one still
    on its way (:mod:`sequencer.rendezvous`).

    Mistakes in the declaration itself (a sync function, a negative retry
    count, a duplicated measurement) raise ``TypeError``/``ValueError`` naming
    the phase at import time, so a product file that loads is well formed.
    """

    def build(f: PhaseFunction) -> Phase:
        phase_name = name or f.__name__
        where = f"phase {phase_name!r}"
        if not inspect.iscoroutinefunction(f):
            raise TypeError(f"{where}: {f.__qualname__} must be an async function (async def)")
        if not _NAME.fullmatch(_FIELD.sub("x", phase_name)):
            raise ValueError(f"{where}: name must start with a letter and use letters, digits, '_', '-', '.' "
                             "(and {fields} that with_args fills)")
        if timeout is not None and (not isinstance(timeout, (int, float)) or not math.isfinite(timeout) or timeout <= 0):
            raise ValueError(f"{where}: timeout must be a positive number of seconds, got {timeout!r}")
        if not isinstance(retries, int) or retries < 0:
            raise ValueError(f"{where}: retries must be a whole number >= 0, got {retries!r}")
        if not isinstance(repeat_limit, int) or repeat_limit < 1:
            raise ValueError(f"{where}: repeat_limit must be a whole number >= 1, got {repeat_limit!r}")
        sampled = tuple(monitors)
        for m in sampled:
            if not isinstance(m, Monitor):
                raise TypeError(f"{where}: monitors must be Monitor objects, got {m!r}")
        given = tuple(measurements)
        # configured() passes the monitors' measurements back in with the monitors: declared once
        declared = (*given, *(m.measurement for m in sampled if m.measurement not in given))
        seen: set[str] = set()
        for m in declared:
            if not isinstance(m, Measurement):
                raise TypeError(f"{where}: measurements must be Measurement objects, got {m!r}")
            if m.name in seen:
                raise ValueError(f"{where}: measurement {m.name!r} is declared twice")
            seen.add(m.name)
        params = []
        for p in inspect.signature(f).parameters.values():
            if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
                raise TypeError(f"{where}: *args/**kwargs cannot be injected; name each fixture")
            if p.default is p.empty:
                params.append(p.name)
        deps, followed = _names(where, "after", after), _names(where, "follows", follows)
        if run_if is not None and not callable(run_if):
            raise TypeError(f"{where}: run_if must be a function of the record so far, got {run_if!r}")
        if not isinstance(teardown, bool):
            raise TypeError(f"{where}: teardown must be True or False, got {teardown!r}")
        if not isinstance(on_fail, str):
            raise TypeError(f"{where}: on_fail must be text (what the operator should do), got {on_fail!r}")
        try:
            bin_ = as_disposition(disposition)
        except ValueError as exc:
            raise ValueError(f"{where}: {exc}") from None
        if rendezvous is not None and (not isinstance(rendezvous, str) or not _NAME.fullmatch(rendezvous)):
            raise ValueError(f"{where}: rendezvous must be a name (letters, digits, '_', '-', '.'), got {rendezvous!r}")
        if rendezvous is not None and teardown:
            raise ValueError(f"{where}: a teardown cannot be a rendezvous: teardowns run whatever happened, "
                             "and no slot may wait on another's")
        if (isinstance(rendezvous_timeout, bool) or not isinstance(rendezvous_timeout, (int, float))
                or not math.isfinite(rendezvous_timeout) or rendezvous_timeout <= 0):
            raise ValueError(f"{where}: rendezvous_timeout must be a positive number of seconds, "
                             f"got {rendezvous_timeout!r}")
        if sim_answer is not None and (not isinstance(sim_answer, str) or not sim_answer.strip()):
            raise TypeError(f"{where}: sim_answer must be the text the simulated operator types, got {sim_answer!r}")
        return Phase(
            fn=f,
            name=phase_name,
            measurements=declared,
            timeout=timeout,
            retries=retries,
            repeat_limit=repeat_limit,
            after=deps,
            follows=followed,
            run_if=run_if,
            teardown=teardown,
            description=inspect.getdoc(f) or "",
            parameters=tuple(params),
            on_fail=on_fail.strip(),
            disposition=bin_,
            rendezvous=rendezvous,
            rendezvous_timeout=float(rendezvous_timeout),
            monitors=sampled,
            sim_answer=sim_answer,
            name_template=phase_name if "{" in phase_name else "",
        )

    if fn is not None:
        return build(fn)
    return build


#: A ``{field}`` (or ``{field:spec}``) in a phase's name, filled by with_args / with_fixtures.
_FIELD = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)(:[^{}]*)?\}")


def _fill(template: str, values: Mapping[str, Any]) -> str:
    """``template`` with the fields ``values`` has filled; the others are left for a later with_args."""

    def one(match: re.Match[str]) -> str:
        key, spec = match.group(1), match.group(2) or ""
        return format(values[key], spec[1:]) if key in values else match.group(0)

    return _FIELD.sub(one, template)


def unfilled(name: str) -> list[str]:
    """The ``{fields}`` left in a phase's name."""
    return [m.group(1) for m in _FIELD.finditer(name)]


def _names(where: str, option: str, given: Any) -> tuple[str, ...]:
    """The names ``after=``/``follows=`` give: phases (groups too, for ``follows``) or their names, one or a list
    (never a string's letters)."""
    from sequencer.group import PhaseGroup  # the group module builds on this one

    if isinstance(given, (str, Phase, PhaseGroup)):
        given = (given,)
    elif not isinstance(given, Iterable):
        raise TypeError(f"{where}: {option} must be phases or their names, got {given!r}")
    names = []
    for d in given:
        if not isinstance(d, (Phase, PhaseGroup, str)):
            raise TypeError(f"{where}: {option} must be phases or their names, got {d!r}")
        names.append(d if isinstance(d, str) else d.name)
    return tuple(names)
