"""Odd arguments to every store method, create and load, on every backend (kvmem.testing.fuzz)."""

from kvmem.testing.fuzz import StoreFuzz


class TestExactFuzz(StoreFuzz):
    backend = "exact"


class TestIVFFuzz(StoreFuzz):
    """Trains at 4 rows, so most stores search through faiss."""

    backend = "ivf"
    options = {"train_size": 4}
    examples = 20                   # each store trains: the slowest of the four


class TestHNSWFuzz(StoreFuzz):
    backend = "hnsw"


class TestLMDBFuzz(StoreFuzz):
    backend = "lmdb"
    needs_path = True
