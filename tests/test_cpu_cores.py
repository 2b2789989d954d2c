"""Engine core pinning on CPU hosts: node-wide core claims and the affinity hand-off."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from serving.cpu_cores import claim_cores, start_on


def test_replicas_get_distinct_cores_and_one_core_is_always_left(tmp_path):
    cores = {0, 1, 2, 3}
    first, second = claim_cores(1, cores, tmp_path), claim_cores(1, cores, tmp_path)
    assert (first.cores, second.cores) == ({3}, {2})
    assert claim_cores(2, cores, tmp_path) is None, "two more would leave no core for everything else"
    third = claim_cores(1, cores, tmp_path)
    assert third.cores == {1}
    assert claim_cores(1, cores, tmp_path) is None
    first.release()
    again = claim_cores(1, cores, tmp_path)
    assert again.cores == {3}, "a released core is free again"
    for claim in (second, third, again):
        claim.release()


def test_nothing_is_claimed_for_less_than_one_core_or_on_a_single_core(tmp_path):
    assert claim_cores(0, {0, 1}, tmp_path) is None
    assert claim_cores(1, {0}, tmp_path) is None


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two cores")
def test_children_started_inside_run_on_the_cores_and_this_process_moves_off_them():
    everything = os.sched_getaffinity(0)
    core = max(everything)
    try:
        with start_on({core}):
            child = subprocess.run([sys.executable, "-c", "import os; print(sorted(os.sched_getaffinity(0)))"],
                                   capture_output=True, text=True, check=True).stdout
        assert child.strip() == f"[{core}]"
        assert os.sched_getaffinity(0) == everything - {core}
    finally:
        for tid in os.listdir("/proc/self/task"):
            os.sched_setaffinity(int(tid), everything)
