"""``sharded``: one store spread over the ranks of a ``torch.distributed`` process group.

Every rank calls ``kvmem.create("sharded", inner=..., ...)`` with the same
arguments and holds a shard of every partition in an ``inner`` store (an in-RAM
backend: exact, ivf, hnsw; ``inner_options`` per shard). The ``driver`` rank (0 by default)
uses the store as a local one; the others call ``store.serve()``, which
returns when the driver closes the store. Or the serving ranks run
:func:`~kvmem.stores.sharded.serving.serve` alone, and the driver creates
and loads stores by itself (any number per group; see ``serving``).

- Ids are global, issued by the driver (its :class:`IdBook` also plans FIFO
  eviction over the whole partition); id ``g`` lives on rank ``g % world``,
  so shards stay balanced under eviction and removal.
- ``search`` sends the queries to every rank, each searches its rows, and
  the driver merges the top-k (scores, ids, keys, values). An ``exact``
  inner store gives exactly one ``exact`` store's answer.
- Every argument is validated on the driver before any shard changes.
- Messages are point-to-point on ``group`` (default: the world group), each
  naming its store: gloo for CPU tensors, nccl for CUDA. A rank that dies or does not answer
  within ``timeout`` seconds raises :class:`~kvmem.stores.sharded.wire.LostRankError`
  (a ``KvmemError``) naming it on the driver; the living ranks keep every row
  they acknowledged (their ``serve()`` raises), and the store refuses further work.
- ``save(path)``: each rank writes its shard (``shard-<rank>.<tag>/``, an
  inner save) and the same ``manifest.json`` naming the world size; a save
  replaces the previous one only once every shard is written. ``kvmem.load``
  on every rank of a group of the same size opens it.

Thread-safe on the driver as any store: one operation is on the wire at a time.
"""

from __future__ import annotations

import dataclasses
import datetime
import secrets
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kvmem import inputs, persist
from kvmem.config import StoreConfig
from kvmem.errors import CorruptStoreError, InvalidInputError, KvmemError, StoreFullError, path_error
from kvmem.idbook import AddPlan, RemovePlan
from kvmem.registry import registry
from kvmem.store import MemoryStore
from kvmem.stores.sharded.merge import merge_topk, place_rows, split_ids
from kvmem.stores.sharded.serving import channel_of, group_shape, join, leave, serve_until, take_open, verdict_of
from kvmem.stores.sharded.shard import Shard
from kvmem.stores.sharded.wire import Link, LostRankError

__all__ = ["ShardedStore"]

Message = tuple[dict[str, Any], list[torch.Tensor]]
_KINDS = {kind.__name__: kind for kind in (InvalidInputError, StoreFullError, CorruptStoreError)}  # a shard's error


class ShardedStore(MemoryStore):
    backend = "sharded"
    defaults = {"inner": "exact", "inner_options": None, "driver": 0, "timeout": 60.0, "group": None}

    def __init__(self, config: StoreConfig, device: torch.device, group: Any, shard: Shard) -> None:
        super().__init__(config, device)
        try:
            self._channel = channel_of(group, config.options["driver"])
        except InvalidInputError:
            shard.inner.close()
            raise
        self._link = Link(group, config.options["driver"], float(config.options["timeout"]), self._channel.lock)
        self._shard = shard
        self._number: int | None = None        # the driver's order of opening: what its messages name
        self._lost: LostRankError | None = None
        self.search_params = type(shard.inner).search_params

    # ------------------------------------------------------------------ description
    @property
    def exact(self) -> bool:
        return self._shard.inner.exact

    @property
    def persistent(self) -> bool:
        return self._shard.inner.persistent

    @property
    def rank(self) -> int:
        return self._link.rank

    @property
    def world(self) -> int:
        return self._link.world

    @property
    def driver(self) -> int:
        return self._link.driver

    @property
    def comm_seconds(self) -> float:
        """Seconds the driver waited on the wire beyond the slowest rank's own work, over every operation."""
        return self._link.comm_seconds

    def nbytes(self) -> int:
        """Bytes held by every shard together."""
        self._check_open()
        with self._lock.read():
            return sum(meta["nbytes"] for meta, _ in self._call("count").values())

    def shard_counts(self) -> list[int]:
        """Rows held by each rank's shard."""
        self._check_open()
        with self._lock.read():
            return [sum(meta["counts"]) for _, (meta, _) in sorted(self._call("count").items())]

    def __repr__(self) -> str:
        return super().__repr__()[:-1] + f", inner={self._shard.inner.backend!r}, world={self.world})"

    # ------------------------------------------------------------------ options and creation
    @classmethod
    def check_options(cls, options: Mapping[str, Any], device: torch.device) -> None:
        inner = options["inner"]
        if inner == cls.backend or not isinstance(inner, str):
            raise InvalidInputError(f"sharded option inner must name another backend; got {inner!r}")
        inner_cls = registry.resolve(inner)
        if registry.specs[inner].marker:
            raise InvalidInputError(f"sharded option inner must be an in-RAM backend (exact, ivf, hnsw); "
                                    f"{inner} keeps its rows on disk in place, which shards do not support yet")
        given = options["inner_options"] or {}
        if not isinstance(given, Mapping):
            raise InvalidInputError(f"sharded option inner_options must be a dict; got {type(given).__name__}")
        unknown = sorted(set(given) - set(inner_cls.defaults))
        if unknown:
            raise InvalidInputError(f"{inner} accepts options ({', '.join(sorted(inner_cls.defaults)) or 'none'}); "
                                    f"got {unknown[0]!r} in inner_options")
        inner_cls.check_options({**inner_cls.defaults, **given}, device)
        if device.type not in inner_cls.devices:
            raise InvalidInputError(f"sharded option inner={inner!r} lives on {sorted(inner_cls.devices)}; got device "
                                    f"{device} (pass device='cpu', or store_options={{'device': 'cpu'}} to hf.attach)")
        driver, timeout = options["driver"], options["timeout"]
        if isinstance(driver, bool) or not isinstance(driver, int) or driver < 0:
            raise InvalidInputError(f"sharded option driver must be a rank (an int >= 0); got {driver!r}")
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0:
            raise InvalidInputError(f"sharded option timeout must be a positive number of seconds; got {timeout!r}")

    @classmethod
    def _create(cls, config: StoreConfig, device: torch.device, path: Path | None) -> ShardedStore:
        if path is not None:
            raise InvalidInputError("sharded keeps its shards in RAM and takes no path; use save(path)")
        group = config.options["group"]
        config = dataclasses.replace(config, options={**config.options, "group": None})   # JSON-ready for a save
        world, rank = group_shape(group, config.options["driver"])
        inner_cls = registry.resolve(config.options["inner"])
        inner_config = dataclasses.replace(config, capacity=None, options={
            **inner_cls.defaults, **(config.options["inner_options"] or {})})
        shard = Shard(inner_cls._create(inner_config, device, None), rank, world)
        store = cls(config, device, group, shard)
        store._handshake(config.to_dict(), {"how": "create"})
        return store

    @classmethod
    def _open_saved(cls, config: StoreConfig, directory: Path, manifest: Mapping[str, Any],
                    device: torch.device) -> ShardedStore:
        layout = manifest.get("sharded")
        if not (isinstance(layout, dict) and isinstance(layout.get("world"), int)
                and isinstance(layout.get("tag"), str) and len(layout["tag"]) == 12):
            raise CorruptStoreError("manifest.json: sharded must name the world size and the save's tag")
        world, rank = group_shape(None, config.options["driver"])
        if world != layout["world"]:
            raise InvalidInputError(f"the save at {directory} holds {layout['world']} shards (world size "
                                    f"{layout['world']}); this process group has {world} ranks: load it on "
                                    f"{layout['world']} ranks")
        next_global = max(manifest["next_ids"], default=0)
        inner_cls = registry.resolve(config.options["inner"])
        problem = None
        try:
            shard = Shard.open_saved(directory, rank, world, layout["tag"], next_global, device)
        except KvmemError as exc:   # still take part in the handshake, so that every rank raises
            problem = exc
            shard = Shard(inner_cls._create(dataclasses.replace(config, capacity=None, options=inner_cls.defaults),
                                            device, None), rank, world)
        store = cls(config, device, None, shard)
        reports = store._handshake(config.to_dict(), {"how": "load", "path": str(directory)}, problem, with_ids=True)
        if store.rank == store.driver:
            try:
                store._restore_book(manifest, reports)
            except CorruptStoreError:
                store.close()                  # releases the serving ranks before the driver raises
                raise
        return store

    def _handshake(self, config: dict[str, Any], how: dict[str, str], problem: KvmemError | None = None,
                   with_ids: bool = False) -> dict[int, Message]:
        """The opening of a store on every rank, ``how`` it opens (``{"how": "create"}`` or ``"load"`` and the
        path). The driver tells every serving rank (which opens its shard now if it runs :func:`serve`);
        each reports its config, any problem opening its shard and (``with_ids``) the ids it holds; the
        driver answers every rank with one verdict: all raise the same error, or none does."""
        link, channel = self._link, self._channel
        mine = ({"op": "hello", "config": config, "problem": None if problem is None else
                 f"{type(problem).__name__}: {problem}"}, [])
        if link.rank != link.driver:
            opening, _ = take_open(channel)
            self._number = opening["store"]
            if problem is None and opening["how"] != how["how"]:
                mine[0]["problem"] = f"KvmemError: the driver {opening['how']}s this store; rank {link.rank} " \
                                     f"{how['how']}s it"
        if with_ids and mine[0]["problem"] is None:
            ids_meta, ids = self._shard.handle({"op": "ids"}, [])
            mine = ({**mine[0], **ids_meta}, ids)
        reports = {link.driver: mine}
        try:
            if link.rank != link.driver:
                verdict = join(link, *mine)
            else:
                verdict = self._open_everywhere(config, how, reports)
        except LostRankError:
            self._finish()
            raise
        if verdict["error"]:
            self._finish()
            kind = CorruptStoreError if "CorruptStoreError" in verdict["error"] else InvalidInputError
            raise kind(verdict["error"])
        channel.stores[self._number] = self
        return reports

    def _open_everywhere(self, config: dict[str, Any], how: dict[str, str], reports: dict[int, Message]
                         ) -> dict[str, Any]:
        """The driver's side of an opening: number the store, tell every rank, gather ``reports``, answer."""
        link = self._link
        with link.lock:
            self._number = next(self._channel.numbers)
            opening = {"op": "open", "store": self._number, "config": config, "device": self.device.type, **how}
            for r in link.servers:
                link.settle(r, link.post(r, opening), "open")
            for r in link.servers:
                reports[r] = link.receive(r, "hello")
            verdict = {"error": verdict_of({r: meta for r, (meta, _) in reports.items()}, link.driver)}
            for r in link.servers:
                link.settle(r, link.post(r, verdict), "hello")
        return verdict

    def _restore_book(self, manifest: Mapping[str, Any], reports: dict[int, Message]) -> None:
        """Rebuild the driver's global id book from the ids every shard reported."""
        per_partition: list[list[np.ndarray]] = [[] for _ in range(self.partitions)]
        for meta, (flat,) in reports.values():
            bounds = np.cumsum([0, *meta["counts"]])
            for p in range(self.partitions):
                per_partition[p].append(flat[bounds[p]:bounds[p + 1]].cpu().numpy())
        ids = [np.concatenate(parts) for parts in per_partition]
        if [len(a) for a in ids] != list(manifest["counts"]):
            raise CorruptStoreError(f"the shards hold {[len(a) for a in ids]} rows per partition; "
                                    f"the manifest says {manifest['counts']}")
        try:
            self._book.restore(np.asarray(manifest["next_ids"]), ids)
        except ValueError as exc:
            raise CorruptStoreError(f"shards: {exc}") from None

    # ------------------------------------------------------------------ the serving side
    def serve(self) -> None:
        """Answer the driver's operations until it closes the store (every rank but the driver calls this).

        Raises :class:`LostRankError` if the driver dies, or the driver's error naming the rank it lost.
        """
        link = self._link
        if link.rank == link.driver:
            raise KvmemError(f"rank {link.rank} drives this sharded store: it uses it, the other ranks serve()")
        MemoryStore._check_open(self)
        serve_until(self._channel, store=self)

    # ------------------------------------------------------------------ the driving side
    def _check_open(self) -> None:
        super()._check_open()
        if self._link.rank != self._link.driver:
            raise KvmemError(f"rank {self._link.rank} serves this sharded store (the driver is rank "
                             f"{self._link.driver}): call store.serve() here and use the store on the driver")

    def _call(self, op: str, tensors: dict[int, list[torch.Tensor]] | None = None,
              metas: dict[int, dict[str, Any]] | None = None, **args: Any) -> dict[int, Message]:
        """Operation ``op`` on every rank (the driver's own shard in process); answers by rank.

        ``args`` go to every rank, ``tensors[rank]`` and ``metas[rank]`` to one.
        """
        lost = self._lost or self._channel.lost
        if lost is not None:
            raise LostRankError(lost.rank, f"{lost}; the store refuses further work")
        link = self._link
        tensors, metas = tensors or {}, metas or {}
        requests = {r: ({"op": op, "store": self._number, **args, **metas.get(r, {})}, tensors.get(r, []))
                    for r in range(self.world)}
        try:
            answers = link.exchange(requests, lambda: self._shard.handle(*requests[link.driver]))
        except LostRankError as exc:
            self._lost = self._channel.lost = exc     # the group is broken for every store on it
            self._abort(exc)
            raise
        for r, (reply, _) in sorted(answers.items()):
            if not reply["ok"]:
                kind = _KINDS.get(reply["error"], KvmemError)
                raise kind(f"sharded store: rank {r} failed {op!r}: {reply['error']}: {reply['message']}")
        return answers

    def _abort(self, lost: LostRankError) -> None:
        """Tell the living ranks the store is over, so their serve() raises instead of waiting."""
        link = self._link
        for r in link.servers:
            if r != lost.rank:
                try:
                    link.settle(r, link.post(r, {"op": "abort", "store": self._number, "rank": lost.rank,
                                                 "message": str(lost)}), "abort",
                                datetime.timedelta(seconds=min(5.0, link.timeout)))
                except LostRankError:
                    pass

    def _write(self, plan: AddPlan, keys: torch.Tensor, values: torch.Tensor) -> None:
        kept = self._id_rows(plan)[0].numpy()                                         # (keep,) same in every partition
        evicted = torch.from_numpy(_padded(plan.evicted, self.partitions))             # (P, e)
        tensors, metas = {}, {}
        for r in range(self.world):
            cols = np.flatnonzero(kept % self.world == r)
            metas[r] = {"first": int(kept[cols[0]]) if len(cols) else -1}
            pick = torch.from_numpy(cols).to(self.device)
            tensors[r] = [keys[:, pick], values[:, pick], evicted]
        self._call("add", tensors, metas)

    def _delete(self, plan: RemovePlan) -> None:
        parts = split_ids(_padded(plan.removed, self.partitions), self.world)
        self._call("remove", {r: [torch.from_numpy(parts[r][0])] for r in range(self.world)})

    def _clear(self, partitions: list[int]) -> None:
        self._call("clear", partitions=partitions)

    def _search_rows(self, queries: torch.Tensor, k: int, params: dict[str, Any]) -> tuple[torch.Tensor, ...]:
        answers = self._call("search", {r: [queries] for r in range(self.world)}, k=k, params=params)
        found = [[t.to(self.device) for t in tensors] for _, (_, tensors) in sorted(answers.items())]
        return merge_topk(found, k)

    def _search(self, queries: torch.Tensor, k: int, params: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        scores, ids, _, _ = self._search_rows(queries, k, params)
        return scores, torch.from_numpy(self._book.slots_of(ids.cpu().numpy().reshape(self.partitions, -1))
                                        ).view(ids.shape)

    def _rows(self, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        ids = self._book.ids_at(slots.cpu().numpy())                                  # (P, m)
        parts = split_ids(ids, self.world)
        answers = self._call("get", {r: [torch.from_numpy(parts[r][0])] for r in range(self.world)})
        keys = place_rows(ids.shape, [(parts[r][1], answers[r][1][0].to(self.device)) for r in range(self.world)])
        values = place_rows(ids.shape, [(parts[r][1], answers[r][1][1].to(self.device)) for r in range(self.world)])
        return torch.from_numpy(ids).to(self.device), keys, values

    # ------------------------------------------------------------------ persistence and closing
    def save(self, path: Any) -> None:
        """Every rank writes its shard, then the same manifest; the previous save goes only after both."""
        self._check_open()
        path = inputs.path(path, "save path").absolute()
        try:
            persist.check_target(path)
        except OSError as exc:                        # a name too long, no permission
            raise path_error(exc, f"cannot save to {path}") from exc
        tag = secrets.token_hex(6)
        with self._lock.read():
            self._call("save", path=str(path), tag=tag)
            manifest = {**persist.manifest_of(self, {}), "sharded": {"world": self.world, "tag": tag}}
            self._call("commit", path=str(path), tag=tag, manifest=manifest, tidy_above=self.world)

    def _save_files(self, directory: Path, tag: str) -> dict[str, str]:
        raise NotImplementedError("sharded saves go through save()")

    def close(self) -> None:
        """On the driver: close every shard and release the serving ranks. Idempotent."""
        if self._closed:
            return
        try:
            if self._link.rank == self._link.driver and self._lost is None and self._channel.lost is None:
                with self._lock.write():
                    self._call("close")
        finally:
            self._finish()

    def _finish(self, close_inner: bool = True) -> None:
        """This rank is done with the store (a lost rank's shard stays readable)."""
        if close_inner:
            self._shard.inner.close()
        if not self._closed:
            self._closed = True
            if self._channel.stores.get(self._number) is self:
                del self._channel.stores[self._number]
            leave(self._channel)


def _padded(rows: list[np.ndarray], partitions: int) -> np.ndarray:
    """Per-partition id lists as one ``(P, m)`` array, ``-1`` padded."""
    out = np.full((partitions, max((len(r) for r in rows), default=0)), -1, np.int64)
    for p, r in enumerate(rows):
        out[p, :len(r)] = r
    return out
