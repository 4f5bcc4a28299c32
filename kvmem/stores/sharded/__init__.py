"""The ``sharded`` backend: one store over the ranks of a torch.distributed process group (see ``store``).

``serve()`` on the serving ranks answers every sharded store the driver opens
on the group until the driver calls ``release()`` (see ``serving``).
"""

from kvmem.stores.sharded.serving import release, serve
from kvmem.stores.sharded.store import ShardedStore
from kvmem.stores.sharded.wire import LostRankError

__all__ = ["ShardedStore", "LostRankError", "serve", "release"]
