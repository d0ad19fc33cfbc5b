"""`make demo`'s actor layout (jobs/demo.py): two single-threaded actors on a CPU machine."""

import os

import pytest
import torch


def test_demo_actors_leave_a_cpu_for_decoding():
    from jobs.demo import demo_actors

    cpus = len(os.sched_getaffinity(0))
    actors, per = demo_actors(0)
    if cpus >= 2 and not torch.cuda.is_available():
        assert actors == 2 and per == pytest.approx((cpus - 1) / 2)
    else:
        assert (actors, per) == (1, 1.0)
    assert actors * per <= max(cpus - 1, 1)  # acs label refuses a layout that reserves every CPU
    assert demo_actors(1) == (1, 1.0)  # asked for: one actor, one reserved CPU
    three = demo_actors(3)
    assert three[0] == 3 and three[1] == pytest.approx(max(cpus - 1, 1) / 3)
