"""cluster/layout.py rank layout; cluster/workers.py rank_env and gpu_env."""

from __future__ import annotations

import random

from cluster.layout import RankSlot, lay_out_ranks
from cluster.workers import gpu_env, rank_env


def test_single_node():
    slots = lay_out_ranks([("n1", "10.0.0.1")] * 3)
    assert [s.rank for s in slots] == [0, 1, 2]
    assert [s.local_rank for s in slots] == [0, 1, 2]
    assert [s.worker_index for s in slots] == [0, 1, 2]
    assert all(s.node_rank == 0 and s.num_nodes == 1 and s.local_world_size == 3 for s in slots)


def test_ranks_contiguous_per_node_and_worker0_node_is_node0():
    workers = [("B", "ip-b"), ("A", "ip-a"), ("B", "ip-b"), ("C", "ip-c"), ("A", "ip-a")]
    slots = lay_out_ranks(workers)
    assert [s.rank for s in slots] == list(range(5))
    assert [s.node_id for s in slots] == ["B", "B", "A", "A", "C"]
    assert [s.worker_index for s in slots] == [0, 2, 1, 4, 3]
    assert [s.node_rank for s in slots] == [0, 0, 1, 1, 2]
    assert [s.local_rank for s in slots] == [0, 1, 0, 1, 0]
    assert [s.local_world_size for s in slots] == [2, 2, 2, 2, 1]
    assert all(s.num_nodes == 3 for s in slots)
    assert [s.node_ip for s in slots] == ["ip-b", "ip-b", "ip-a", "ip-a", "ip-c"]
    # rank 0 is on the node of worker 0 and is worker 0
    assert slots[0].worker_index == 0 and slots[0].node_id == workers[0][0]
    # each worker gets exactly one rank
    assert sorted(s.worker_index for s in slots) == list(range(len(workers)))


def test_ranks_on_a_node_are_contiguous_for_interleaved_workers():
    workers = [(f"n{i % 3}", f"ip{i % 3}") for i in range(9)]
    slots = lay_out_ranks(workers)
    for node in {s.node_id for s in slots}:
        ranks = [s.rank for s in slots if s.node_id == node]
        assert ranks == list(range(ranks[0], ranks[0] + len(ranks)))
        assert [s.local_rank for s in slots if s.node_id == node] == list(range(len(ranks)))


def test_empty():
    assert lay_out_ranks([]) == []


def _slot(rank, local_rank, node_rank, worker_index, node_id, lws=2, nn=1):
    return RankSlot(
        rank=rank,
        local_rank=local_rank,
        local_world_size=lws,
        node_rank=node_rank,
        num_nodes=nn,
        worker_index=worker_index,
        node_id=node_id,
        node_ip="ip",
    )


def test_rank_env():
    slot = _slot(rank=3, local_rank=1, node_rank=1, worker_index=5, node_id="B", lws=2, nn=2)
    env = rank_env(slot, world_size=4, master_addr="10.0.0.1", master_port=29501)
    assert env == {
        "RANK": "3",
        "WORLD_SIZE": "4",
        "LOCAL_RANK": "1",
        "LOCAL_WORLD_SIZE": "2",
        "NODE_RANK": "1",
        "GROUP_RANK": "1",
        "GROUP_WORLD_SIZE": "2",
        "ROLE_RANK": "3",
        "ROLE_WORLD_SIZE": "4",
        "ROLE_NAME": "default",
        "NUM_NODES": "2",
        "MASTER_ADDR": "10.0.0.1",
        "MASTER_PORT": "29501",
    }
    assert all(isinstance(v, str) for v in env.values())


# gpu_env is tested with FAKE node infos: this is the one place in these tests where a
# made-up list of GPU ids stands in for real GPUs (the machine running them has none).
# (tests/cluster/test_gpu_placement.py has Ray hand out fake GPU resources to real actors.)

def _gpu_layout(workers: list[tuple[str, list[str]]]):
    """(node_id, gpu ids) per worker -> (slots, env per worker), as WorkerGroup.start makes them."""
    infos = [{"node_id": node, "node_ip": f"ip-{node}", "gpu_ids": gpus} for node, gpus in workers]
    slots = lay_out_ranks([(i["node_id"], i["node_ip"]) for i in infos], [i["gpu_ids"] for i in infos])
    return slots, gpu_env(infos, slots)


def _assert_local_rank_is_the_device(workers, slots, env):
    """LOCAL_RANK names the rank's own (lowest) GPU in its CUDA_VISIBLE_DEVICES, which every
    worker of a node shares and which lists exactly that node's GPUs."""
    for slot in slots:
        mine = env[slot.worker_index]
        visible = mine["CUDA_VISIBLE_DEVICES"].split(",")
        assert int(mine["TRAINCTL_DEVICE_INDEX"]) == slot.local_rank, (slot, mine)
        assert visible[slot.local_rank] == min(workers[slot.worker_index][1], key=int)
        same_node = [s for s in slots if s.node_id == slot.node_id]
        assert {env[s.worker_index]["CUDA_VISIBLE_DEVICES"] for s in same_node} == {mine["CUDA_VISIBLE_DEVICES"]}
        node_gpus = {g for s in same_node for g in workers[s.worker_index][1]}
        assert sorted(visible) == sorted(node_gpus) and len(visible) == len(node_gpus)


def test_workers_of_a_node_are_ranked_by_their_gpu():
    """Ray hands worker 0 GPU 3 and worker 1 GPU 2: worker 1 becomes local rank 0 (Ray Train's order)."""
    slots, env = _gpu_layout([("n1", ["3"]), ("n1", ["2"])])
    assert [s.worker_index for s in slots] == [1, 0]
    assert env[0]["CUDA_VISIBLE_DEVICES"] == env[1]["CUDA_VISIBLE_DEVICES"] == "2,3"
    assert env[1]["TRAINCTL_DEVICE_INDEX"] == "0" and env[0]["TRAINCTL_DEVICE_INDEX"] == "1"
    assert env[0]["TRAINCTL_USE_GPU"] == env[1]["TRAINCTL_USE_GPU"] == "1"


def test_local_rank_is_the_device_for_shuffled_gpus_on_several_nodes():
    rng = random.Random(7)
    for _ in range(200):
        gpus_per_worker = rng.choice([1, 2])
        workers = []
        for node in range(rng.randint(1, 3)):
            n_workers = rng.randint(1, 4)
            ids = [str(g) for g in rng.sample(range(16), n_workers * gpus_per_worker)]
            workers += [(f"n{node}", ids[w * gpus_per_worker:(w + 1) * gpus_per_worker]) for w in range(n_workers)]
        rng.shuffle(workers)  # Ray starts the actors in any order
        slots, env = _gpu_layout(workers)
        _assert_local_rank_is_the_device(workers, slots, env)


def test_the_device_agrees_with_local_rank_even_for_a_layout_made_without_gpu_ids():
    """gpu_env lists each local rank's GPU at position LOCAL_RANK, whatever order the ranks came in."""
    workers = [("n1", ["3"]), ("n1", ["2"]), ("n1", ["10"])]
    infos = [{"gpu_ids": gpus} for _, gpus in workers]
    slots = lay_out_ranks([("n1", "ip")] * 3)  # ranks in worker order: GPUs 3, 2, 10
    env = gpu_env(infos, slots)
    _assert_local_rank_is_the_device(workers, slots, env)
    assert env[0]["CUDA_VISIBLE_DEVICES"] == "3,2,10"


def test_a_worker_with_two_gpus_sees_its_first_at_local_rank():
    slots, env = _gpu_layout([("n1", ["2", "3"]), ("n1", ["0", "1"])])
    assert [s.worker_index for s in slots] == [1, 0]
    assert env[0]["CUDA_VISIBLE_DEVICES"] == "0,2,1,3"  # every worker's first GPU, then the others
    assert (env[1]["TRAINCTL_DEVICE_INDEX"], env[0]["TRAINCTL_DEVICE_INDEX"]) == ("0", "1")


def test_fractional_gpus_share_the_index_of_their_gpu():
    """Two workers on each GPU (gpus_per_worker 0.5, allowed only with the gloo backend)."""
    slots, env = _gpu_layout([("n1", ["1"]), ("n1", ["0"]), ("n1", ["1"]), ("n1", ["0"])])
    assert [s.worker_index for s in slots] == [1, 3, 0, 2]  # by GPU, then worker order
    assert {e["CUDA_VISIBLE_DEVICES"] for e in env.values()} == {"0,1"}
    assert [env[s.worker_index]["TRAINCTL_DEVICE_INDEX"] for s in slots] == ["0", "0", "1", "1"]


def test_gpu_ids_sort_as_numbers_and_nodes_stay_separate():
    slots, env = _gpu_layout([("a", ["10"]), ("b", ["0"]), ("a", ["2"])])
    assert [(s.node_id, s.worker_index) for s in slots] == [("a", 2), ("a", 0), ("b", 1)]
    assert env[0]["CUDA_VISIBLE_DEVICES"] == env[2]["CUDA_VISIBLE_DEVICES"] == "2,10"  # not "10,2"
    assert (env[2]["TRAINCTL_DEVICE_INDEX"], env[0]["TRAINCTL_DEVICE_INDEX"]) == ("0", "1")
    assert env[1] == {"CUDA_VISIBLE_DEVICES": "0", "TRAINCTL_USE_GPU": "1", "TRAINCTL_DEVICE_INDEX": "0"}


def test_workers_without_gpus_see_none_and_deepspeed_uses_the_cpu():
    """Ray 2.60 leaves a num_gpus=0 actor the node's CUDA_VISIBLE_DEVICES: trainctl empties it."""
    slots, env = _gpu_layout([("n1", []), ("n2", [])])
    assert env == {0: {"CUDA_VISIBLE_DEVICES": "", "DS_ACCELERATOR": "cpu"},
                   1: {"CUDA_VISIBLE_DEVICES": "", "DS_ACCELERATOR": "cpu"}}
    assert [s.worker_index for s in slots] == [0, 1]


def test_a_rank_reads_back_a_device_that_passes_its_own_check():
    """The variables a worker gets, read as the rank reads them (WorkerEnv.from_environ), pass
    the rank's device check with as many CUDA devices as it was shown."""
    from strategies.base import WorkerEnv, cuda_device_problem

    workers = [("n1", ["5"]), ("n2", ["1"]), ("n1", ["4"]), ("n2", ["0"])]
    slots, env = _gpu_layout(workers)
    for slot in slots:
        environ = {**rank_env(slot, len(slots), "ip-n1", 29500), **env[slot.worker_index]}
        rank = WorkerEnv.from_environ(environ)
        visible = environ["CUDA_VISIBLE_DEVICES"]
        assert rank.use_gpu and rank.device_index == rank.local_rank
        assert cuda_device_problem(rank, len(visible.split(",")), visible) is None
