"""What a scanned code is: the station's rules for the barcodes and QR codes the operator scans.

A scanner is a keyboard to the station (a *keyboard wedge*: it types the
code and Enter on the station's input) or a serial device named in the
station file (``[scan] port``); either way each scan is one line of text.
The station tells what a line is by these rules, tried in this order
(``[scan]`` key: the key of the station file that changes the rule):

==============  ===============  ====================  ==================================================
kind            ``[scan]`` key   default rule          what it does
==============  ===============  ====================  ==================================================
``badge``       ``badge``        ``OP:`` + name        the operator: stamped on every run started from
                                                       then on
``work_order``  ``work_order``   ``WO:`` + batch       the traveller's work order: the batch of every run
                                                       from then on
``slot``        ``slot``         ``SLOT:`` + number    "this slot" (a code on the jig by each slot): the
                                                       next label is its unit's; on a station that starts
                                                       on scans, it starts the slot
``start``       ``start_code``   ``START``             start every slot whose board waits for its start
``label``       ``serial``       the product's         the unit's serial, from its label: bound to the
                                 ``serial_pattern``    slot whose board waits for it ("scan the label of
                                                       slot 3")
==============  ===============  ====================  ==================================================

Anything else is an answer to the operator's open question, as typed
text always was. Each rule is a prefix (the value is the rest of the
line), or ``re:`` and a regular expression the whole line must match
(its ``value`` group, else all of it, is the value); the station file's
``[scan]`` table changes any of them (docs/operating.md).

A scan's value is checked before it is taken: a name or a batch is
printable text of at most :data:`MAX_VALUE` characters, a slot is one of
the station's, a label matches the product's serial pattern whole. What
a run was started with is kept in its record (:class:`~sequencer.records.ScanRecord`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import attrs

__all__ = [
    "BADGE", "LABEL", "SCAN_KINDS", "SLOT", "START", "WORK_ORDER", "Rule", "ScanConfig", "ScanRules",
    "check_value",
]

BADGE, WORK_ORDER, SLOT, START, LABEL = "badge", "work_order", "slot", "start", "label"
#: Every kind of scan, in the order the rules are tried (a label last: it has no prefix).
SCAN_KINDS = (BADGE, WORK_ORDER, SLOT, START, LABEL)
#: The longest name, batch or label taken from a scan.
MAX_VALUE = 64
#: What marks a rule as a regular expression rather than a prefix.
PATTERN_MARK = "re:"
#: How a slot starts its test: when a board is put in, or when the operator scans (or presses) start.
START_MODES = ("board", "scan")


@attrs.frozen
class Rule:
    """One kind of scan: a prefix the line starts with, or a regular expression it matches whole."""

    kind: str
    prefix: str | None = None
    pattern: re.Pattern[str] | None = None

    @classmethod
    def parse(cls, kind: str, text: str) -> Rule:
        """``text`` as the station file writes it: a prefix, or ``re:`` and a regular expression."""
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"{kind} must be a prefix or re: and a regular expression, got {text!r}")
        if text.startswith(PATTERN_MARK):
            try:
                return cls(kind, pattern=re.compile(text[len(PATTERN_MARK):]))
            except re.error as exc:
                raise ValueError(f"{kind}: {text[len(PATTERN_MARK):]!r} is not a regular expression: {exc}") from None
        return cls(kind, prefix=text)

    def value_of(self, text: str) -> str | None:
        """The value ``text`` carries if it is this kind of scan, else None."""
        if self.pattern is not None:
            found = self.pattern.fullmatch(text)
            if found is None:
                return None
            return found.group("value") if "value" in self.pattern.groupindex else found.group(0)
        assert self.prefix is not None
        if self.kind == START:
            return "" if text.casefold() == self.prefix.casefold() else None  # a code, nothing after it
        return text[len(self.prefix):].strip() if text[:len(self.prefix)].casefold() == self.prefix.casefold() else None

    def describe(self) -> str:
        """How the operator recognises it: ``OP:...``, ``START``, ``SN\\d{9}``."""
        if self.pattern is not None:
            return self.pattern.pattern
        return self.prefix if self.kind == START else f"{self.prefix}..."


DEFAULT_RULES = {BADGE: "OP:", WORK_ORDER: "WO:", SLOT: "SLOT:", START: "START"}
#: The ``[scan]`` keys that set a rule, and its kind (``start`` and ``label`` there are settings).
RULE_KEYS = {"badge": BADGE, "work_order": WORK_ORDER, "slot": SLOT, "start_code": START, "serial": LABEL}


@attrs.frozen
class ScanConfig:
    """``[scan]`` in the station file: where scans come from, what they look like, and what starts a slot."""

    #: "board": a slot starts when a board is put in; "scan": when its start is scanned or pressed (a jig
    #: whose USB adapter is always there cannot tell a board is in)
    start: str = attrs.field(default="board")
    #: every unit's label is scanned before its test starts
    label: bool = False
    #: a serial scanner's port; None: scans are typed on the station's input (a keyboard wedge)
    port: str | None = None
    baudrate: int = 9600
    #: the rules by kind, as the station file writes them (prefixes, or re: patterns)
    rules: Mapping[str, str] = attrs.field(factory=lambda: dict(DEFAULT_RULES))

    def __attrs_post_init__(self) -> None:
        if self.start not in START_MODES:
            raise ValueError(f"start must be one of {', '.join(START_MODES)}, got {self.start!r}")
        if isinstance(self.baudrate, bool) or not isinstance(self.baudrate, int) or self.baudrate <= 0:
            raise ValueError(f"baudrate must be a positive whole number, got {self.baudrate!r}")
        for kind, text in self.rules.items():
            if kind not in SCAN_KINDS:
                raise ValueError(f"unknown kind of scan {kind!r} (known: {', '.join(SCAN_KINDS)})")
            Rule.parse(kind, text)

    @classmethod
    def from_table(cls, **table: Any) -> ScanConfig:
        """From the station file's ``[scan]`` keys (their types checked by the caller); ValueError naming the key."""
        rules = dict(DEFAULT_RULES)
        settings: dict[str, Any] = {}
        for key, value in table.items():
            if key in RULE_KEYS:
                Rule.parse(key, value)  # named by its key in the file, not by its kind
                rules[RULE_KEYS[key]] = value
            else:
                settings[key] = value
        return cls(**settings, rules=rules)

    @property
    def needs_scans(self) -> bool:
        """Whether a slot waits for a scan before it starts."""
        return self.start == "scan" or self.label


@attrs.frozen
class ScanRules:
    """The station's rules, with the label's pattern (the product's serial pattern) filled in."""

    rules: tuple[Rule, ...]
    #: the product whose labels are scanned, for the operator's messages
    product: str = ""

    @classmethod
    def of(cls, config: ScanConfig, serial_pattern: str | None, product: str = "") -> ScanRules:
        """The rules of ``config``; the label's is the station file's ``serial`` rule, else the product's pattern."""
        rules = [Rule.parse(kind, text) for kind, text in config.rules.items() if kind != LABEL]
        label = config.rules.get(LABEL)
        if label is not None:
            rules.append(Rule.parse(LABEL, label))
        elif serial_pattern is not None:
            rules.append(Rule(LABEL, pattern=re.compile(serial_pattern)))
        rules.sort(key=lambda r: SCAN_KINDS.index(r.kind))
        return cls(tuple(rules), product)

    @property
    def reads_labels(self) -> bool:
        return any(r.kind == LABEL for r in self.rules)

    def classify(self, text: str) -> tuple[str, str] | None:
        """What ``text`` is (its kind, and its value), or None: not a scan, an answer."""
        for rule in self.rules:
            value = rule.value_of(text)
            if value is not None:
                return rule.kind, value
        return None

    def describe(self) -> str:
        """Every kind the station knows, for a refusal's hint: ``badge OP:..., work order WO:..., ...``."""
        return ", ".join(f"{r.kind.replace('_', ' ')} {r.describe()}" for r in self.rules)


def check_value(kind: str, value: str) -> str:
    """``value`` if a scan of ``kind`` may carry it; ValueError saying why not (a one-line hint)."""
    if kind in (BADGE, WORK_ORDER, LABEL):
        what = {BADGE: "a name", WORK_ORDER: "a work order", LABEL: "a label"}[kind]
        if not value:
            raise ValueError(f"the {kind.replace('_', ' ')} scan carries no {what[2:]}")
        if len(value) > MAX_VALUE or not value.isprintable() or value != value.strip():
            raise ValueError(f"{value[:MAX_VALUE]!r} is not {what} (printable, at most {MAX_VALUE} characters)")
        if kind == WORK_ORDER and any(c in value for c in "/\\"):
            raise ValueError(f"{value!r} is not a work order: it names the batch's report folder, so no / or \\")
    return value
