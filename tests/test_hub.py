"""The hub (kvmem.stores._hub): query-routed lists, checked against a brute-force reading of what they must hold."""

import math

import numpy as np
import pytest
import torch
from kvmem.benchmarks.datasets import ood

import kvmem
from kvmem.stores import _calibrate
from kvmem.stores._hub import MIN_DEPTH, PROBES, SAMPLE_DEPTH, Hub, depth_for, kmeans, merge


@pytest.fixture(autouse=True)
def keep_hub(monkeypatch):
    """The stores here are about their hub: keep it whatever the timing (tests/test_asked.py tests the choice)."""
    monkeypatch.setattr(_calibrate, "_MARGIN", math.inf)


def store_and_sample(metric: str, n: int = 3000, dim: int = 16, asked: int = 160, seed: int = 3):
    data = ood(n, dim, queries=40, asked=asked, seed=seed, metric="l2" if metric == "l2" else "ip")
    store = kvmem.create("ivf", dim=dim, value_dim=1, metric=metric, dtype=torch.float32, train_size=1000,
                         nlist=16, query_sample=0)            # no hub of its own: the tests build one
    store.add(torch.from_numpy(data.base), torch.zeros(n, 1))
    queries = torch.from_numpy(data.asked)
    truth = store.exact_slots(queries[None], [0], 40)[0]
    ids = store._table.data["ids"][0][truth]
    return store, data, queries, ids


def brute_scores(metric: str, q: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    if metric == "l2":
        return -torch.cdist(q[None], keys[None])[0]
    if metric == "cos":
        return torch.nn.functional.normalize(q, dim=1) @ torch.nn.functional.normalize(keys, dim=1).T
    return q @ keys.T


@pytest.mark.parametrize("metric", ["ip", "cos", "l2"])
def test_each_list_is_the_union_of_its_queries_neighbours_and_hands_over_its_best(metric):
    store, data, queries, ids = store_and_sample(metric)
    hub = Hub(store, 0, queries, ids, seed=1)
    assert 1 < len(hub.centroids) < len(queries)
    owner = hub._near(hub._route(queries)).argmax(1)
    for c, (lid, keys, _) in enumerate(hub.lists):
        want = torch.unique(ids[owner == c])
        assert torch.equal(lid, want[want >= 0]), c
        slots = torch.from_numpy(store._book.slots_in(0, lid.numpy()))
        assert torch.allclose(brute_scores(metric, queries[:1], keys),
                              brute_scores(metric, queries[:1], store._table.data["keys"][0][slots]), atol=1e-5)
    fresh = torch.from_numpy(data.queries)
    got = hub.candidates(store, 0, fresh, 5).view(len(fresh), -1, 5)
    probes = hub.probes(fresh)
    if metric == "l2":                                                   # routed by distance to the centroids
        order = torch.cdist(fresh, hub.centroids).argsort(1)[:, :PROBES]
    else:                                                                # by cosine
        order = (torch.nn.functional.normalize(fresh, dim=1) @ hub.centroids.T).argsort(1, descending=True)[:, :PROBES]
    assert (probes == order).float().mean() > 0.99                       # up to float ties
    assert probes.shape == (len(fresh), PROBES)
    every = store._table.data["keys"][0]
    for i in range(len(fresh)):
        for r, c in enumerate(probes[i].tolist()):
            lid = hub.lists[c][0]
            slots = torch.from_numpy(store._book.slots_in(0, lid.numpy()))
            best = brute_scores(metric, fresh[i:i + 1], every[slots])[0].topk(5).values
            mine = brute_scores(metric, fresh[i:i + 1], every[got[i, r]])[0].sort(descending=True).values
            assert torch.allclose(mine, best, atol=1e-4), (i, c)


def test_leaving_out_withholds_exactly_the_ids_only_that_query_brought_to_its_list():
    store, _, queries, ids = store_and_sample("ip")
    hub = Hub(store, 0, queries, ids, seed=0)
    width = 40 * PROBES                                   # every member of a small list can be handed over
    owner = hub._near(hub._route(queries)).argmax(1)
    assert torch.equal(hub.probes(queries)[:, 0], owner)                  # its own list comes first
    kept = hub.candidates(store, 0, queries, width)[:, :width]           # from its own list
    left = hub.candidates(store, 0, queries, width, leave_out=True)[:, :width]
    withheld = 0
    for i in range(len(queries)):
        mates = (owner == owner[i]) & (torch.arange(len(queries)) != i)
        alone = np.array(sorted(set(ids[i].tolist()) - set(ids[mates].view(-1).tolist())))
        alone = set(store._book.slots_in(0, alone).tolist()) if len(alone) else set()
        got_left, got_kept = set(left[i].tolist()) - {-1}, set(kept[i].tolist()) - {-1}
        assert not got_left & alone, i                                    # never its own contribution
        assert got_kept - got_left <= alone, i                            # and nothing else withheld
        withheld += len(got_kept - got_left)
    assert withheld > 0                                                   # the case was exercised


def test_removed_rows_leave_the_lists_and_are_never_candidates():
    store, data, queries, ids = store_and_sample("ip")
    gone = ids[:20, :5].reshape(-1).unique()
    store.remove(gone)
    hub = Hub(store, 0, queries, ids, seed=0)
    listed = torch.cat([lid for lid, _, _ in hub.lists])
    assert not bool(torch.isin(listed, gone).any())
    got = hub.candidates(store, 0, torch.from_numpy(data.queries), 32)
    present = store._table.data["ids"][0][got[got >= 0]]
    assert not bool(torch.isin(present, gone).any()) and (got >= 0).any()


def test_kmeans_is_seeded_and_spherical_unless_l2():
    x = torch.randn(300, 8) + 3
    a, b = kmeans(x, 10, "ip", seed=4), kmeans(x, 10, "ip", seed=4)
    assert torch.equal(a, b) and not torch.equal(a, kmeans(x, 10, "ip", seed=5))
    assert torch.allclose(a.norm(dim=1), torch.ones(10), atol=1e-5)
    l2 = kmeans(x, 10, "l2", seed=4)
    assert l2.norm(dim=1).min() > 2                                      # means of points around (3, ..., 3)
    near = torch.cdist(x, l2).argmin(1)
    for c in near.unique().tolist():                                       # a Lloyd step moves no centroid far
        assert torch.allclose(x[near == c].mean(0), l2[c], atol=0.5), c


@pytest.mark.parametrize("metric", ["ip", "l2"])
def test_added_keys_join_the_lists_of_the_queries_they_would_serve(metric):
    store, _, queries, ids = store_and_sample(metric)
    hub = Hub(store, 0, queries, ids, seed=0)                            # the store holds no hub: extended by hand
    assert bool(torch.isfinite(hub.floor).all())                        # 3000 rows: every query has 40 neighbours
    before = [len(lid) for lid, _, _ in hub.lists]
    near = queries[0] * 50 if metric == "ip" else queries[0].clone()     # query 0's best key by far
    nowhere = torch.zeros_like(near) if metric == "ip" else torch.full_like(near, 1e4)
    new = torch.stack([near, nowhere])
    near_id, nowhere_id = store.add(new, torch.zeros(2, 1)).tolist()
    hub.extend(torch.tensor([near_id, nowhere_id]), new)
    served = hub._score(queries, *hub._prepared(near[None]))[:, 0] >= hub.floor        # (S,) who it would serve
    for c, (lid, keys, _) in enumerate(hub.lists):
        joined = bool(served[hub.owner == c].any())
        assert len(lid) == before[c] + joined and (near_id in lid.tolist()) == joined, c
        assert len(keys) == len(lid) == len(hub.sole[c]), c
    for c, (lid, _, _) in enumerate(hub.lists):                          # who brought it, when one query did
        members = (served & (hub.owner == c)).nonzero().view(-1)
        if len(members):
            assert int(hub.sole[c][lid.tolist().index(near_id)]) == (int(members[0]) if len(members) == 1 else -1)
    assert served[0] and all(nowhere_id not in lid.tolist() for lid, _, _ in hub.lists)   # it beats no floor
    top = hub.candidates(store, 0, queries[:1], 1)[0]
    assert store._book.slots_in(0, np.array([near_id]))[0] in top.tolist()


def test_a_store_extends_its_hub_as_it_grows():
    data = ood(4000, 16, queries=20, asked=200, seed=9)
    store = kvmem.create("ivf", dim=16, value_dim=1, dtype=torch.float32, train_size=1000, nlist=16)
    store.add(torch.from_numpy(data.base), torch.zeros(4000, 1))
    for lo in range(0, 200, 50):
        store.search(torch.from_numpy(data.asked[lo:lo + 50]), 32)
    store._settle()
    hub = store._hubs[0]
    q = torch.from_numpy(data.asked[:1])
    new = int(store.add(q * 50, torch.zeros(1, 1))[0])                # under a quarter more rows: no rebuild
    assert store._hubs[0] is hub and new in hub.lists[int(hub.owner[0])][0].tolist()
    assert int(store.search(q, 1, nprobe=1).ids[0, 0]) == new


def test_a_larger_sample_keeps_fewer_neighbours_each_and_the_same_total():
    assert [depth_for(rows) for rows in (1, 100_000, 1_000_000, 10**8)] == [256, 256, 488, 1024]
    assert all(depth_for(rows, s) == depth_for(rows) for rows in (10, 10**6) for s in (1, 64, SAMPLE_DEPTH))
    assert depth_for(1_000_000, 2 * SAMPLE_DEPTH) == 244 and depth_for(1_000_000, 4 * SAMPLE_DEPTH) == MIN_DEPTH
    assert depth_for(10**8, 4 * SAMPLE_DEPTH) == 256 and depth_for(100_000, 10**6) == MIN_DEPTH


def test_a_store_asked_a_large_sample_calibrates_its_hub_at_the_sample_s_depth(monkeypatch):
    import kvmem.stores._hub as hub_module

    monkeypatch.setattr(hub_module, "SAMPLE_DEPTH", 100)        # small enough that a test's sample passes it
    monkeypatch.setattr(hub_module, "MIN_DEPTH", 40)
    data = ood(3000, 16, queries=20, asked=400, seed=4)
    store = kvmem.create("ivf", dim=16, value_dim=1, dtype=torch.float32, train_size=1000, nlist=16)
    store.add(torch.from_numpy(data.base), torch.zeros(3000, 1))
    store.calibrate(torch.from_numpy(data.asked))
    assert store._hubs[0].ids.shape == (400, 64)                    # 256 * 100 // 400
    store.calibrate(torch.from_numpy(data.asked[:50]))
    assert store._hubs[0].ids.shape == (50, 256)
    store.close()


def test_a_large_add_extends_the_lists_in_chunks_as_one_add_would(monkeypatch):
    import kvmem.stores._hub as hub_module

    store, data, queries, ids = store_and_sample("ip")
    new = torch.from_numpy(data.asked[:50].copy()) * 3
    added = store.add(new, torch.zeros(50, 1))
    whole, chunked = Hub(store, 0, queries, ids, seed=0), Hub(store, 0, queries, ids, seed=0)
    whole.extend(added, new)
    monkeypatch.setattr(hub_module, "_EXTEND_CHUNK", 7)
    chunked.extend(added, new)
    assert sum(len(lid) for lid, _, _ in whole.lists) > sum(len(lid) for lid, _, _ in Hub(store, 0, queries, ids).lists)
    for (a, ka, _), (b, kb, _), sa, sb in zip(whole.lists, chunked.lists, whole.sole, chunked.sole):
        assert torch.equal(a, b) and torch.equal(ka, kb) and torch.equal(sa, sb)


def test_removed_and_evicted_rows_leave_a_live_stores_lists():
    data = ood(3000, 16, queries=20, asked=200, seed=4)
    store = kvmem.create("ivf", dim=16, value_dim=1, dtype=torch.float32, train_size=1000, nlist=16, capacity=3100)
    ids = store.add(torch.from_numpy(data.base), torch.zeros(3000, 1))
    for lo in range(0, 200, 50):
        store.search(torch.from_numpy(data.asked[lo:lo + 50]), 32)
    store._settle()
    hub = store._hubs[0]
    listed = lambda: torch.cat([lid for lid, _, _ in hub.lists])                # noqa: E731
    gone = listed()[:10]
    store.remove(gone)
    assert not bool(torch.isin(listed(), gone).any())
    assert all(len(lid) == len(keys) == len(sole) for (lid, keys, _), sole in zip(hub.lists, hub.sole))
    before = listed()
    store.add(torch.from_numpy(data.base[:200].copy()), torch.zeros(200, 1))   # past capacity: FIFO eviction
    evicted = ids[~torch.from_numpy(store._book.slots_in(0, ids.numpy(), strict=False) >= 0)]
    assert len(store) == 3100 and bool(torch.isin(before, evicted).any())     # listed rows were evicted
    held = torch.from_numpy(store._book.slots_in(0, listed().numpy(), strict=False))
    assert store._hubs[0] is hub and bool((held >= 0).all())                 # and left the lists


@pytest.mark.parametrize("metric", ["ip", "l2"])
def test_each_querys_floor_is_the_score_of_its_worst_kept_neighbour(metric):
    store, _, queries, ids = store_and_sample(metric)
    hub = Hub(store, 0, queries, ids, seed=0)
    worst = store._table.data["keys"][0][torch.from_numpy(store._book.slots_in(0, ids[:, -1].numpy()))]
    if metric == "l2":                                       # ranks as -|q - x|^2, less the query's own |q|^2
        want = -(queries - worst).square().sum(1) + queries.square().sum(1)
    else:
        want = (queries * worst).sum(1)
    assert torch.allclose(hub.floor, want, rtol=1e-4, atol=1e-3)


def test_more_probes_score_more_lists_and_count_their_keys():
    store, data, queries, ids = store_and_sample("ip")
    hub = Hub(store, 0, queries, ids, seed=0)
    fresh = torch.from_numpy(data.queries)
    for probes in (1, PROBES, 5):
        lists = hub.probes(fresh, probes)
        assert lists.shape == (len(fresh), probes)
        assert hub.candidates(store, 0, fresh, 8, probes=probes).shape == (len(fresh), probes * 8)
        sizes = torch.tensor([len(lid) for lid, _, _ in hub.lists])
        assert torch.equal(hub.scored(fresh, probes), sizes[lists].sum(1) + len(hub.centroids))


def test_merge_keeps_each_candidate_once_and_pads_with_minus_one():
    index, extra = torch.tensor([[5, 3, -1], [7, 7, 2]]), torch.tensor([[3, 9], [2, 1]])
    got = merge(index, extra)
    assert got.shape == (2, 5)
    for row, want in zip(got.tolist(), [{3, 5, 9}, {1, 2, 7}]):
        kept = [s for s in row if s != -1]
        assert sorted(kept) == sorted(want) and row.count(-1) == 5 - len(want)


def test_restoring_lists_that_name_absent_rows_is_refused():
    store, _, queries, ids = store_and_sample("ip")
    hub = Hub(store, 0, queries, ids, seed=0)
    flat = hub.flat()
    bad = flat["list_ids"].clone()
    bad[0] = 10**9
    with pytest.raises(ValueError, match="names a row the partition does not hold"):
        hub.restore(store, 0, bad, flat["list_sizes"], flat["sole"])
    hub.restore(store, 0, flat["list_ids"], flat["list_sizes"], flat["sole"])        # the good ones round-trip
    assert torch.equal(torch.cat([lid for lid, _, _ in hub.lists]), flat["list_ids"])


def test_nbytes_counts_the_sample_its_neighbours_and_every_list():
    store, _, queries, ids = store_and_sample("l2")
    hub = Hub(store, 0, queries, ids, seed=0)
    lists = sum(lid.numel() * 8 + keys.numel() * 4 + bias.numel() * 4 for lid, keys, bias in hub.lists)
    sample = queries.numel() * 4 + ids.numel() * 8 + hub.centroids.numel() * 4 + len(queries) * (8 + 4)
    sole = sum(s.numel() * 8 for s in hub.sole)
    assert hub.nbytes() == lists + sample + sole
