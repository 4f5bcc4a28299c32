"""kvmem: an external key-value memory for attention layers.

>>> import kvmem, torch
>>> store = kvmem.create("exact", dim=4, value_dim=2)
>>> ids = store.add(torch.randn(10, 4), torch.randn(10, 2))
>>> store.search(torch.randn(3, 4), k=2).ids.shape
torch.Size([3, 2])
"""

from kvmem.api import backends, create, load
from kvmem.config import StoreConfig
from kvmem.errors import BackendUnavailableError, CorruptStoreError, InvalidInputError, KvmemError, StoreFullError
from kvmem.registry import registry
from kvmem.store import MemoryStore, SearchResult

__version__ = "0.1.0"

__all__ = [
    "create", "load", "backends", "registry", "MemoryStore", "SearchResult", "StoreConfig",
    "KvmemError", "InvalidInputError", "CorruptStoreError", "StoreFullError", "BackendUnavailableError",
]
