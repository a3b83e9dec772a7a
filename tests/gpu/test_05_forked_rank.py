"""A rank forked from the warm zygote (cluster/rank_host.py) can use CUDA: the zygote imports
torch without initialising CUDA, so each fork initialises its own, on the GPUs its
CUDA_VISIBLE_DEVICES names. Not run on CPU-only machines (tests/multiprocess/test_zygote.py covers the rest)."""

from __future__ import annotations

import pytest

from orchestrator.control.supervisor import outcome_exit
from tests import zygote_ranks
from tests.multiprocess.test_zygote import _HostThread

pytestmark = [pytest.mark.gpu, pytest.mark.timeout(240)]


def test_two_forked_ranks_in_turn_each_use_the_gpu_they_were_given():
    host = _HostThread()
    try:
        for _ in range(2):  # the second fork is as clean as the first: CUDA was never set up in the zygote
            outcome = host.launch(zygote_ranks.cuda_sum, env={"CUDA_VISIBLE_DEVICES": "0"})[2].result(180)
            seen = outcome_exit(outcome)
            assert seen.error is None and seen.died is None, (seen, outcome.text)
            assert seen.value == {"count": 1, "sum": 1024.0, "visible": "0"}
    finally:
        host.close()
