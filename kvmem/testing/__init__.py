"""The conformance suite every backend passes (needs the ``test`` extra: pytest, hypothesis).

- :class:`StoreConformance`: pytest tests, subclass once per backend.
- :func:`store_machine`: a Hypothesis state machine against the NumPy oracle.
- :class:`BruteForceMemory`: the oracle.
"""

from kvmem.testing.checks import check_get, check_search, snapshot
from kvmem.testing.conformance import StoreConformance, randn
from kvmem.testing.model import BruteForceMemory
from kvmem.testing.stateful import StoreMachine, store_machine

__all__ = ["StoreConformance", "StoreMachine", "store_machine", "BruteForceMemory", "check_search",
           "check_get", "snapshot", "randn"]
