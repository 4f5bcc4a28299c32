"""The ``sharded`` backend: one store over the ranks of a torch.distributed process group (see ``store``)."""

from kvmem.stores.sharded.store import ShardedStore
from kvmem.stores.sharded.wire import LostRankError

__all__ = ["ShardedStore", "LostRankError"]
