"""CPU binding of local ranks: parsing the kernel's CPU lists, grouping hardware threads into physical
cores, one block of whole cores per rank, and a real bind of this process's threads."""

import os
import threading

import pytest

from ampray.actors.affinity import bind_process, parse_cpu_list, physical_cores, rank_cpus


def test_parse_cpu_list():
    assert parse_cpu_list("0-3,8,10-11\n") == {0, 1, 2, 3, 8, 10, 11}
    assert parse_cpu_list("5") == {5}


def smt_pairs(n: int):
    """A VM-like layout of n CPUs whose hardware-thread pairs are (i, i + n/2)."""
    return lambda cpu: {cpu % (n // 2), cpu % (n // 2) + n // 2}


def test_physical_cores_group_siblings_and_drop_cpus_not_allowed():
    assert physical_cores(range(8), smt_pairs(8)) == [[0, 4], [1, 5], [2, 6], [3, 7]]
    # Only one thread of core 1 is allowed: the core counts with what is allowed of it.
    assert physical_cores({0, 1, 4}, smt_pairs(8)) == [[0, 4], [1]]


def test_each_rank_gets_whole_cores_and_no_core_is_shared():
    blocks = [rank_cpus(r, 2, range(32), smt_pairs(32)) for r in range(2)]
    assert blocks[0] == set(range(0, 8)) | set(range(16, 24))
    assert blocks[1] == set(range(8, 16)) | set(range(24, 32))
    cores_of = [{c % 16 for c in b} for b in blocks]
    assert not cores_of[0] & cores_of[1]  # no physical core in both
    # 3 ranks on 4 cores: one core each, the fourth left unbound.
    assert [rank_cpus(r, 3, range(8), smt_pairs(8)) for r in range(3)] == [{0, 4}, {1, 5}, {2, 6}]


def test_fewer_cores_than_ranks_leaves_every_cpu():
    assert rank_cpus(1, 4, {0, 1}, lambda c: {0, 1}) == {0, 1}


def test_bad_local_rank_names_the_field():
    with pytest.raises(ValueError, match="local_rank=2 is not allowed"):
        rank_cpus(2, 2, range(4))


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="Linux CPU affinity")
def test_bind_process_binds_every_thread_and_threads_started_later():
    before = os.sched_getaffinity(0)
    one = {min(before)}
    stop = threading.Event()
    early = threading.Thread(target=stop.wait)
    early.start()
    try:
        assert bind_process(one) >= 2
        assert os.sched_getaffinity(early.native_id) == one
        seen = {}
        later = threading.Thread(target=lambda: seen.update(cpus=os.sched_getaffinity(0)))
        later.start()
        later.join()
        assert seen["cpus"] == one
    finally:
        stop.set()
        early.join()
        bind_process(before)
    assert os.sched_getaffinity(0) == before
