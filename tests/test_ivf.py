"""The ivf backend: conformance before and after training, recall, calibration, growth, files."""

from kvmem.testing import StoreConformance, store_machine


class TestIVF(StoreConformance):
    """Defaults: small partitions are searched exactly until they reach train_size."""

    backend = "ivf"
    exact = False
    recall_threshold = 0.99


class TestIVFTrained(StoreConformance):
    """Trains at 20 rows, so every test below runs through faiss."""

    backend = "ivf"
    exact = False
    recall_threshold = 0.9
    options = {"train_size": 20}


TestIVFMachine = store_machine("ivf", exact=False, recall_threshold=0.99).TestCase
TestIVFTrainedMachine = store_machine("ivf", options={"train_size": 8}, exact=False, recall_threshold=0.85).TestCase
