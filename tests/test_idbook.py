"""IdBook directly: what a loader's restore refuses (each check reached only through a damaged save)."""

import numpy as np
import pytest

from kvmem.idbook import IdBook


@pytest.mark.parametrize("ids, next_id, why", [
    ([0, 5], 5, "in \\[0, next id 5\\)"),          # an id the partition never issued
    ([-1, 2], 5, "in \\[0, next id 5\\)"),         # a negative id
    ([3, 3], 5, "unique"),                         # an id in two slots
    ([0, 1, 2], 5, "exceed capacity 2"),           # more rows than the capacity
])
def test_restore_refuses_inconsistent_ids(ids, next_id, why):
    book = IdBook(1, capacity=2)
    with pytest.raises(ValueError, match=why):
        book.restore(np.array([next_id]), [np.array(ids)])


def test_restore_rebuilds_slots_and_ids():
    book = IdBook(2, capacity=3)
    book.restore(np.array([9, 0]), [np.array([8, 4, 6]), np.array([], np.int64)])
    assert book.counts.tolist() == [3, 0] and book.next_ids.tolist() == [9, 0]
    assert book.slots_of(np.array([[6, 4, 8, -1], [-1, -1, -1, -1]])).tolist() == [[2, 1, 0, -1], [-1] * 4]
    plan = book.plan_add(1)                                    # full: the oldest id (4) is evicted
    assert plan.ids.tolist() == [[9], [0]] and plan.evicted[0].tolist() == [4] and plan.slots[0].tolist() == [1]


def test_removed_and_evicted_ids_have_no_slot():
    """slots_in without ``strict`` gives -1 for an id that is gone (the hub's candidates rely on it), and the
    moved row's slot follows it."""
    book = IdBook(1, capacity=4)
    plan = book.plan_add(4)
    book.commit_add(plan)
    book.commit_remove(book.plan_remove(np.array([[1]])))      # slot 1 freed; the last row (id 3) moves there
    assert book.slots_in(0, np.array([0, 1, 2, 3]), strict=False).tolist() == [0, -1, 2, 1]
    book.commit_add(book.plan_add(2))                          # 4 takes evicted id 0's slot, 5 the free one
    assert book.slots_in(0, np.array([0, 1, 2, 3, 4, 5]), strict=False).tolist() == [-1, -1, 2, 1, 0, 3]
    with pytest.raises(ValueError, match="id 1 of partition 0 is not in the store: it was removed"):
        book.slots_of(np.array([[1]]))
