"""Many sharded stores on one process group, and the serving ranks' loop.

Every sharded store of a group shares the group's :class:`Channel`. The
driver numbers its stores in the order it opens them and every message names
its store, so one loop on a serving rank answers every store of the group,
whichever the driver uses next. A serving rank either

- calls ``kvmem.create`` / ``kvmem.load`` with the driver's arguments, in
  the driver's order, then ``store.serve()`` (which answers every store of
  the group until that one is closed); or
- runs :func:`serve`, which opens this rank's shard of every store the
  driver creates or loads meanwhile (``hf.attach`` makes one per memory layer
  on the model's first forward) and returns when the driver calls
  :func:`release`.
"""

from __future__ import annotations

import datetime
import itertools
import threading
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from kvmem.errors import InvalidInputError, KvmemError
from kvmem.stores.sharded.wire import IDLE, Link, LostRankError

if TYPE_CHECKING:
    from kvmem.stores.sharded.store import ShardedStore

__all__ = ["Channel", "channel_of", "group_shape", "join", "release", "serve", "serve_until", "take_open",
           "verdict_of"]

Message = tuple[dict[str, Any], list[torch.Tensor]]
_CHANNELS: dict[int, Channel] = {}
_REGISTRY_LOCK = threading.Lock()


class Channel:
    """What the sharded stores of one group share on this rank: the driver, the wire's lock, the open stores.

    ``users`` counts open stores and running serving loops; the channel is forgotten when it drops to 0.
    """

    def __init__(self, group: Any, pg: Any, driver: int) -> None:
        self.group, self.pg, self.driver = group, pg, driver
        self.lock = threading.Lock()
        self.link = Link(group, driver, 60.0, self.lock)     # the serving loop's receiver (it waits IDLE)
        self.stores: dict[int, ShardedStore] = {}            # by number: the driver's order of opening
        self.numbers = itertools.count()                     # the driver's next store number
        self.pending: Message | None = None                  # an "open" the loop is answering by opening here
        self.lost: LostRankError | None = None               # the driver lost a rank: the group is broken
        self.users = 0


def channel_of(group: Any, driver: int) -> Channel:
    """The channel of ``group`` on this rank (made on first use); one driver per group."""
    pg = group if group is not None else dist.group.WORLD
    with _REGISTRY_LOCK:
        channel = _CHANNELS.get(id(pg))
        if channel is None or channel.pg is not pg:
            channel = _CHANNELS[id(pg)] = Channel(group, pg, driver)
        elif channel.driver != driver:
            raise InvalidInputError(f"sharded option driver: the sharded stores of one process group share one "
                                    f"driver, rank {channel.driver} here; got driver={driver} (give this store a "
                                    f"group of its own: group=torch.distributed.new_group(...))")
        channel.users += 1
    return channel


def leave(channel: Channel) -> None:
    """A store closed or a loop ended on ``channel``."""
    with _REGISTRY_LOCK:
        channel.users -= 1
        if channel.users <= 0 and _CHANNELS.get(id(channel.pg)) is channel:
            del _CHANNELS[id(channel.pg)]


# ---------------------------------------------------------------------- opening a store
def join(link: Link, hello: dict[str, Any], tensors: list[torch.Tensor] = ()) -> dict[str, Any]:
    """A serving rank's side of an opening: report ``hello`` to the driver, return the driver's verdict."""
    link.settle(link.driver, link.post(link.driver, hello, list(tensors)), "hello", IDLE)
    verdict, _ = link.receive(link.driver, "hello", IDLE)
    return verdict


def group_shape(group: Any, driver: int) -> tuple[int, int]:
    """``(world size, this rank)`` of ``group``; raises when there is no process group or no such driver."""
    if not (dist.is_available() and dist.is_initialized()):
        raise InvalidInputError("sharded needs an initialised torch.distributed process group: call "
                                "torch.distributed.init_process_group (torchrun sets up its environment) "
                                "on every rank before kvmem.create")
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    if rank < 0:
        raise InvalidInputError("this process is not a member of the group given to the sharded store")
    if driver >= world:
        raise InvalidInputError(f"sharded option driver must be a rank of the group, in [0, {world}); got {driver}")
    return world, rank


def verdict_of(reports: dict[int, dict[str, Any]], driver: int) -> str | None:
    """The first problem among the ranks' reports, naming the rank; None when all agree."""
    for r, report in sorted(reports.items()):
        if report["problem"]:
            return f"sharded store: rank {r}: {report['problem']}"
        if report["config"] != reports[driver]["config"]:
            return (f"sharded store: every rank must call create with the same arguments; rank {r} has "
                    f"{report['config']}, the driver (rank {driver}) has {reports[driver]['config']}")
    return None


# ---------------------------------------------------------------------- serving ranks
def serve(group: Any = None, driver: int = 0) -> None:
    """Serve every sharded store ``driver`` opens or has opened on ``group`` until it calls :func:`release`.

    For every rank but the driver. Stores this rank created itself are served too.
    Raises :class:`LostRankError` when the driver dies or tells of a rank it lost.
    """
    if isinstance(driver, bool) or not isinstance(driver, int) or driver < 0:
        raise InvalidInputError(f"sharded serve(): driver must be a rank (an int >= 0); got {driver!r}")
    group_shape(group, driver)
    channel = channel_of(group, driver)
    try:
        if channel.link.rank == driver:
            raise KvmemError(f"rank {driver} drives the sharded stores of this group: it calls release() "
                             f"when done, the other ranks serve()")
        serve_until(channel)
    finally:
        leave(channel)


def serve_until(channel: Channel, store: ShardedStore | None = None, opening: bool = False) -> Message | None:
    """Answer the driver's messages on ``channel``.

    Returns: with ``store``, once it is closed; with ``opening``, the next "open" (this rank is creating a
    store itself and takes it); else at the driver's "release". Every other store's messages are answered
    meanwhile, and an "open" not awaited opens this rank's shard here.
    """
    link = channel.link
    while True:
        meta, tensors = link.receive(channel.driver, None, IDLE)
        op = meta["op"]
        if op == "open" and opening:
            return meta, tensors
        if op == "open":
            _open_here(channel, meta, tensors)
            continue
        if op == "release":
            link.settle(channel.driver, link.post(channel.driver, {"ok": True}), op, IDLE)
            if store is None and not opening:
                return None
            raise KvmemError(f"sharded store: the driver (rank {channel.driver}) released the serving ranks while "
                             f"rank {link.rank} still waits for a store of its own: create the same stores in the "
                             f"same order on every rank")
        target = channel.stores.get(meta.get("store"))
        if op == "abort":
            if target is not None:
                target._finish(close_inner=False)
            raise LostRankError(meta["rank"], meta["message"] + f" (rank {link.rank} keeps the rows of its shards)")
        if target is None:
            answer = ({"ok": False, "error": "KvmemError", "message": f"rank {link.rank} holds no sharded store "
                       f"number {meta.get('store')}"}, [])
        else:
            answer = target._shard.handle(meta, [t.to(target.device) for t in tensors])
        link.settle(channel.driver, link.post(channel.driver, *answer), op, IDLE)   # the driver keeps time
        if op == "close" and target is not None:
            target._finish()
        if store is not None and store._closed:
            return None


def _open_here(channel: Channel, meta: dict[str, Any], tensors: list[torch.Tensor]) -> None:
    """This rank's shard of a store the driver creates or loads; a refusal here is reported to the driver."""
    from kvmem.api import create, load

    channel.pending = (meta, tensors)
    try:
        if meta["how"] == "load":
            load(meta["path"], device=meta["device"])
        else:
            config = meta["config"]
            options = {k: v for k, v in config["options"].items() if k != "group"}
            create("sharded", dim=config["dim"], value_dim=config["value_dim"], partitions=config["partitions"],
                   metric=config["metric"], dtype=config["dtype"], capacity=config["capacity"],
                   device=meta["device"], group=channel.group, **options)
    except LostRankError:
        raise
    except Exception as exc:        # noqa: BLE001 - every refusal goes to the driver, which raises it on every rank
        if channel.pending is not None:            # refused before its handshake: answer the driver's open
            join(channel.link, {"op": "hello", "config": None, "problem": f"{type(exc).__name__}: {exc}"})
    finally:
        channel.pending = None


def take_open(channel: Channel) -> Message:
    """On a serving rank opening a store: the driver's "open" for it (answering other stores meanwhile)."""
    if channel.pending is not None:
        message, channel.pending = channel.pending, None
        return message
    return serve_until(channel, opening=True)


# ---------------------------------------------------------------------- the driver
def release(group: Any = None, timeout: float = 60.0) -> None:
    """On the driver: close every sharded store it drives on ``group`` and end the serving ranks' :func:`serve`."""
    if not (dist.is_available() and dist.is_initialized()):
        raise InvalidInputError("sharded release() needs an initialised torch.distributed process group")
    channel = channel_of(group, dist.get_rank(group))
    try:
        for store in list(channel.stores.values()):
            store.close()
        if channel.lost is not None:
            return
        link = channel.link
        with link.lock:
            sent = {r: link.post(r, {"op": "release"}) for r in link.servers}
            deadline = datetime.timedelta(seconds=timeout)
            for r, work in sent.items():
                link.settle(r, work, "release", deadline)
                link.receive(r, "release", deadline)
    finally:
        leave(channel)
