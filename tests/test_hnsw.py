"""The hnsw backend: conformance, recall, calibration, per-call ef, growth, files."""

from kvmem.testing import StoreConformance, store_machine


class TestHNSW(StoreConformance):
    backend = "hnsw"
    exact = False
    recall_threshold = 0.95


TestHNSWMachine = store_machine("hnsw", exact=False, recall_threshold=0.95).TestCase
