"""cluster/layout.py rank layout; cluster/workers.py rank_env and gpu_env."""

from __future__ import annotations

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
        "NUM_NODES": "2",
        "MASTER_ADDR": "10.0.0.1",
        "MASTER_PORT": "29501",
    }
    assert all(isinstance(v, str) for v in env.values())


# gpu_env is tested with FAKE node infos: this is the one place in these tests where a
# made-up list of GPU ids stands in for real GPUs (the machine running them has none).


def test_gpu_env_two_workers_one_node():
    infos = [{"gpu_ids": ["0"]}, {"gpu_ids": ["1"]}]
    slots = lay_out_ranks([("n1", "ip"), ("n1", "ip")])
    env = gpu_env(infos, slots)
    assert env[0]["CUDA_VISIBLE_DEVICES"] == "0,1"
    assert env[1]["CUDA_VISIBLE_DEVICES"] == "0,1"
    assert env[0]["TRAINCTL_DEVICE_INDEX"] == "0"
    assert env[1]["TRAINCTL_DEVICE_INDEX"] == "1"
    assert env[0]["TRAINCTL_USE_GPU"] == env[1]["TRAINCTL_USE_GPU"] == "1"


def test_gpu_env_device_index_follows_own_gpu_not_rank():
    # worker 0 holds GPU 3, worker 1 holds GPU 2: ids sort numerically, so worker 0 is index 1
    infos = [{"gpu_ids": ["3"]}, {"gpu_ids": ["2"]}]
    slots = lay_out_ranks([("n1", "ip"), ("n1", "ip")])
    env = gpu_env(infos, slots)
    assert env[0]["CUDA_VISIBLE_DEVICES"] == env[1]["CUDA_VISIBLE_DEVICES"] == "2,3"
    assert env[0]["TRAINCTL_DEVICE_INDEX"] == "1"
    assert env[1]["TRAINCTL_DEVICE_INDEX"] == "0"


def test_gpu_env_numeric_order_and_nodes_separate():
    infos = [{"gpu_ids": ["10"]}, {"gpu_ids": ["0"]}, {"gpu_ids": ["2"]}]
    slots = lay_out_ranks([("a", "ip-a"), ("b", "ip-b"), ("a", "ip-a")])
    env = gpu_env(infos, slots)
    assert env[0]["CUDA_VISIBLE_DEVICES"] == "2,10"  # not "10,2"
    assert env[2]["CUDA_VISIBLE_DEVICES"] == "2,10"
    assert env[0]["TRAINCTL_DEVICE_INDEX"] == "1"
    assert env[2]["TRAINCTL_DEVICE_INDEX"] == "0"
    assert env[1] == {
        "CUDA_VISIBLE_DEVICES": "0",
        "TRAINCTL_USE_GPU": "1",
        "TRAINCTL_DEVICE_INDEX": "0",
    }


def test_gpu_env_without_gpus_is_empty():
    infos = [{"gpu_ids": []}, {"gpu_ids": []}]
    assert gpu_env(infos, lay_out_ranks([("n1", "ip"), ("n2", "ip2")])) == {}
