"""sequencer: an async test sequencer for factory test and provisioning, built on trio.

The names a product file needs::

    from sequencer import Measurement, PhaseResult, Product, phase
    from sequencer import PhaseGroup, checkpoint      # groups of phases, OpenHTF's checkpoints
    from sequencer import Monitor                     # a function sampled while a phase runs
"""

from sequencer.group import PhaseGroup, checkpoint
from sequencer.monitors import Monitor
from sequencer.measurements import Measurement, custom, equals, in_range, matches, one_of, within_percent
from sequencer.phase import Phase, PhaseResult, phase
from sequencer.product import Product
from sequencer.records import Outcome

__all__ = [
    "Measurement",
    "Monitor",
    "Outcome",
    "Phase",
    "PhaseGroup",
    "PhaseResult",
    "Product",
    "checkpoint",
    "custom",
    "equals",
    "in_range",
    "matches",
    "one_of",
    "phase",
    "within_percent",
]
