"""The lmdb backend: conformance, the state machine, and what only a store on disk must do."""

from kvmem.testing import StoreConformance, store_machine


class TestLMDB(StoreConformance):
    backend = "lmdb"
    needs_path = True


class TestLMDBSmallBlocks(StoreConformance):
    """Blocks of 16 rows: every add, removal and search crosses block boundaries."""

    backend = "lmdb"
    needs_path = True
    options = {"block_rows": 16}


TestLMDBMachine = store_machine("lmdb", needs_path=True).TestCase
TestLMDBSmallBlocksMachine = store_machine("lmdb", needs_path=True, options={"block_rows": 16}).TestCase
