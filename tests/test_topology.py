"""Launcher detection, Slurm host lists, size validation, and megatron-core groups on gloo."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist

from parallel.dims import ParallelDims
from parallel.topology import ParallelSizes, init_distributed, shutdown, validate_sizes
from parallel.world import World, detect_world, expand_nodelist
from testing.local import free_ports, run_ranks

TORCHRUN = {
    "RANK": "5",
    "WORLD_SIZE": "8",
    "LOCAL_RANK": "1",
    "MASTER_ADDR": "10.0.0.7",
    "MASTER_PORT": "29500",
}

# What `srun -n 2` inside `sbatch -n 4` sets for its task 1 (the variables Slurm 22.05 set).
SRUN_TASK = {
    "SLURM_JOB_ID": "14242",
    "SLURM_STEP_ID": "0",
    "SLURM_PROCID": "1",
    "SLURM_NTASKS": "2",
    "SLURM_LOCALID": "1",
    "SLURM_STEP_NODELIST": "gpu[07-08]",
    "SLURM_JOB_NODELIST": "gpu[03,07-08]",
}

# The batch shell of that job: no srun, so no SLURM_STEP_ID, yet SLURM_NTASKS is the job's 4.
BATCH_SHELL = {
    "SLURM_JOB_ID": "14242",
    "SLURM_PROCID": "0",
    "SLURM_NTASKS": "4",
    "SLURM_LOCALID": "0",
    "SLURM_JOB_NODELIST": "gpu[03,07-08]",
}


def test_torchrun_env() -> None:
    assert detect_world(TORCHRUN) == World(5, 8, 1, "10.0.0.7", 29500, "torchrun")


def test_torchrun_wins_over_slurm() -> None:
    world = detect_world({**SRUN_TASK, **TORCHRUN})
    assert (world.launcher, world.rank, world.master_port) == ("torchrun", 5, 29500)


def test_default_env_is_os_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in TORCHRUN.items():
        monkeypatch.setenv(name, value)
    assert detect_world() == detect_world(TORCHRUN)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"RANK": "five"}, "RANK='five'"),
        ({"RANK": "-1"}, "RANK='-1'"),
        ({"WORLD_SIZE": " 8"}, "WORLD_SIZE=' 8'"),
        ({"WORLD_SIZE": "0"}, "WORLD_SIZE=0 must be at least 1"),
        ({"RANK": "8"}, "RANK=8 must be below WORLD_SIZE=8"),
        ({"LOCAL_RANK": "9"}, "LOCAL_RANK=9 must be below WORLD_SIZE=8"),
        ({"LOCAL_RANK": None}, "LOCAL_RANK is not set"),
        ({"WORLD_SIZE": None}, "WORLD_SIZE is not set"),
        ({"MASTER_ADDR": ""}, "MASTER_ADDR is not set"),
        ({"MASTER_PORT": "70000"}, "MASTER_PORT=70000 is not a TCP port"),
        ({"MASTER_PORT": "0"}, "MASTER_PORT=0 is not a TCP port"),
    ],
)
def test_torchrun_garbled(change: dict[str, str | None], message: str) -> None:
    env = {k: v for k, v in {**TORCHRUN, **change}.items() if v is not None}
    with pytest.raises(ValueError, match=message):
        detect_world(env)


def test_srun_task() -> None:
    # The step's first node, not the job's: the job's list starts with a node outside the step.
    assert detect_world(SRUN_TASK) == World(1, 2, 1, "gpu07", 24242, "slurm")


def test_slurm_job_nodelist_when_no_step_nodelist() -> None:
    env = {k: v for k, v in SRUN_TASK.items() if k != "SLURM_STEP_NODELIST"}
    assert detect_world(env).master_addr == "gpu03"


def test_slurm_master_overrides() -> None:
    world = detect_world({**SRUN_TASK, "MASTER_ADDR": "head.ib", "MASTER_PORT": "31000"})
    assert (world.master_addr, world.master_port) == ("head.ib", 31000)


def test_slurm_port_agreed_by_every_task_and_differs_between_jobs() -> None:
    def task_env(job: int, rank: int) -> dict[str, str]:
        local = {"SLURM_PROCID": str(rank), "SLURM_LOCALID": str(rank % 4)}
        return {**SRUN_TASK, "SLURM_JOB_ID": str(job), "SLURM_NTASKS": "16", **local}

    for job in (7, 123456):
        masters = {
            (world.master_addr, world.master_port)
            for world in (detect_world(task_env(job, rank)) for rank in range(16))
        }
        assert masters == {("gpu07", 20000 + job % 10000)}
    assert detect_world(task_env(7, 0)).master_port != detect_world(task_env(8, 0)).master_port


def test_batch_shell_is_one_process() -> None:
    assert detect_world(BATCH_SHELL) == detect_world({})


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"SLURM_JOB_ID": None}, "SLURM_JOB_ID is not set"),
        ({"SLURM_NTASKS": "2x"}, "SLURM_NTASKS='2x'"),
        ({"SLURM_PROCID": "2"}, "SLURM_PROCID=2 must be below SLURM_NTASKS=2"),
        ({"SLURM_LOCALID": None}, "SLURM_LOCALID is not set"),
        ({"SLURM_STEP_NODELIST": None, "SLURM_JOB_NODELIST": None}, "set MASTER_ADDR"),
        ({"SLURM_STEP_NODELIST": "gpu[07-08"}, r"'gpu\[07-08'"),
    ],
)
def test_slurm_garbled(change: dict[str, str | None], message: str) -> None:
    env = {k: v for k, v in {**SRUN_TASK, **change}.items() if v is not None}
    with pytest.raises(ValueError, match=message):
        detect_world(env)


def test_single_process() -> None:
    assert detect_world({}) == World(0, 1, 0, "127.0.0.1", 0, "single")


@pytest.mark.parametrize(
    ("nodelist", "hosts"),
    [
        ("node[01-04,07]", ["node01", "node02", "node03", "node04", "node07"]),
        ("a1,b[2-3]", ["a1", "b2", "b3"]),
        ("gpu-[1-2]-ib", ["gpu-1-ib", "gpu-2-ib"]),
        ("rack[1-2]-n[1-2]", ["rack1-n1", "rack1-n2", "rack2-n1", "rack2-n2"]),
        ("rack[01-02]-n[5,7],login", ["rack01-n5", "rack01-n7", "rack02-n5", "rack02-n7", "login"]),
        ("n[8-10]", ["n8", "n9", "n10"]),
        ("n[098-100]", ["n098", "n099", "n100"]),
        ("x1.cluster.org,x-2,x_3", ["x1.cluster.org", "x-2", "x_3"]),
        ("localhost", ["localhost"]),
    ],
)
def test_expand_nodelist(nodelist: str, hosts: list[str]) -> None:
    assert expand_nodelist(nodelist) == hosts


@pytest.mark.parametrize(
    ("nodelist", "problem"),
    [
        ("", "empty host name"),
        ("a,,b", "empty host name"),
        ("node[1-2", "'[' without ']'"),
        ("node1-2]", "']' without '['"),
        ("n[[1-2]]", "nested"),
        ("node[5-3]", "reversed range '5-3'"),
        ("node[]", "bad range ''"),
        ("node[a-c]", "bad range 'a-c'"),
        ("node[1-]", "bad range '1-'"),
        ("node 1", "invalid characters"),
    ],
)
def test_expand_nodelist_errors(nodelist: str, problem: str) -> None:
    with pytest.raises(ValueError) as error:
        expand_nodelist(nodelist)
    assert str(error.value).startswith(f"bad Slurm node list {nodelist!r}: ")
    assert problem in str(error.value)


def test_data_parallel_size() -> None:
    assert ParallelSizes(tensor=2, pipeline=2, context=2).data(32) == 4
    assert ParallelSizes().data(3) == 3
    with pytest.raises(ValueError, match=r"world size 6 .* 2 x 2 x 1 = 4"):
        ParallelSizes(tensor=2, pipeline=2).data(6)
    with pytest.raises(ValueError, match="world size 0 must be at least 1"):
        ParallelSizes().data(0)


@pytest.mark.parametrize("field", ["tensor", "pipeline", "context"])
def test_sizes_must_be_positive(field: str) -> None:
    with pytest.raises(ValueError, match=f"{field} parallel size must be >= 1"):
        ParallelSizes(**{field: 0})


def test_validate_sizes() -> None:
    dims = {"model.width": 128, "model.hdim": 256, "padded vocabulary": 2048}
    validate_sizes(16, ParallelSizes(tensor=4, pipeline=2), dims)
    with pytest.raises(ValueError, match=r"world size 12 .* 4 x 2 x 1 = 8"):
        validate_sizes(12, ParallelSizes(tensor=4, pipeline=2), dims)
    with pytest.raises(ValueError, match=r"model\.width=96 .* tensor-parallel size 64"):
        validate_sizes(64, ParallelSizes(tensor=64), {**dims, "model.width": 96})
    with pytest.raises(ValueError, match=r"padded vocabulary=50257 .* tensor-parallel size 2"):
        validate_sizes(2, ParallelSizes(tensor=2), {**dims, "padded vocabulary": 50257})


def test_bad_sizes_fail_before_any_collective() -> None:
    # Were the group created first, rank 0 of 4 would wait for the missing ranks, then fail
    # with a store timeout instead of this ValueError.
    world = World(0, 4, 0, "127.0.0.1", free_ports(1)[0], "torchrun")
    with pytest.raises(ValueError, match="world size 4 is not a multiple"):
        init_distributed(ParallelSizes(tensor=3), world=world, timeout_s=5)
    assert not dist.is_initialized()
    shutdown()  # nothing to shut down: a no-op


def test_single_topology_creates_no_group() -> None:
    topo = ParallelDims.single()
    assert topo.is_main and (topo.tp_rank, topo.dp_rank, topo.dp_size) == (0, 0, 1)
    assert topo.world.world_size == 1 and topo.backend in ("gloo", "nccl")
    assert not dist.is_initialized()


def _observe(topo: ParallelDims) -> list[int]:
    return [topo.tp_rank, topo.dp_rank, topo.dp_size, topo.pp_rank, topo.cp_rank]


def _group_sum(value: int, group: dist.ProcessGroup | None) -> int:
    tensor = torch.tensor([value])
    dist.all_reduce(tensor, group=group)
    return int(tensor.item())


def _worker(rank: int, world_size: int, ports: list[int]) -> dict[str, object]:
    """Several configurations in one process: each spawn costs seconds of imports."""
    from megatron.core import parallel_state as mpu

    seen: dict[str, object] = {}
    # World of 4 from torchrun's variables; megatron's layout: tp [0,1] [2,3], dp [0,2] [1,3].
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE="4",
        LOCAL_RANK=str(rank),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(ports[0]),
    )
    topo = init_distributed(ParallelSizes(tensor=2), timeout_s=60)
    seen["tp2"] = _observe(topo)
    seen["tp2_main"] = [topo.is_main, topo.world.launcher, topo.backend]
    seen["tp2_tp_sum"] = _group_sum(10**rank, mpu.get_tensor_model_parallel_group())
    seen["tp2_dp_sum"] = _group_sum(10**rank, mpu.get_data_parallel_group())
    shutdown()

    def world4(sizes: ParallelSizes, port: int) -> list[int]:
        world = World(rank, 4, rank, "127.0.0.1", port, "torchrun")
        observed = _observe(init_distributed(sizes, world=world, timeout_s=60))
        shutdown()
        return observed

    seen["pp2"] = world4(ParallelSizes(pipeline=2), ports[1])
    seen["tp2cp2"] = world4(ParallelSizes(tensor=2, context=2), ports[2])

    # Two independent worlds of 2 at once: ranks {0,1} and {2,3}.
    pair = World(rank % 2, 2, rank % 2, "127.0.0.1", ports[3 + rank // 2], "torchrun")
    topo = init_distributed(ParallelSizes(), world=pair, timeout_s=60)
    seen["dp2"] = _observe(topo)
    seen["dp2_sum"] = _group_sum(rank, mpu.get_data_parallel_group())
    shutdown()

    # A one-process group, as a single-process run gets it.
    topo = init_distributed(ParallelSizes(), world=detect_world({}), timeout_s=60)
    seen["single"] = [*_observe(topo), _group_sum(rank, None)]
    shutdown()
    seen["left_initialized"] = dist.is_initialized()
    return seen


def test_megatron_groups_on_gloo() -> None:
    seen = run_ranks(_worker, 4, free_ports(5), timeout=120)
    # Columns: tp_rank, dp_rank, dp_size, pp_rank, cp_rank.
    expected = {
        "tp2": [[0, 0, 2, 0, 0], [1, 0, 2, 0, 0], [0, 1, 2, 0, 0], [1, 1, 2, 0, 0]],
        "tp2_tp_sum": [11, 11, 1100, 1100],
        "tp2_dp_sum": [101, 1010, 101, 1010],
        # Pipeline stages are the outermost split: [0,1] stage 0, [2,3] stage 1.
        "pp2": [[0, 0, 2, 0, 0], [0, 1, 2, 0, 0], [0, 0, 2, 1, 0], [0, 1, 2, 1, 0]],
        # Context parallel next to tensor: cp groups [0,2] [1,3], no data parallelism.
        "tp2cp2": [[0, 0, 1, 0, 0], [1, 0, 1, 0, 0], [0, 0, 1, 0, 1], [1, 0, 1, 0, 1]],
        "dp2": [[0, 0, 2, 0, 0], [0, 1, 2, 0, 0], [0, 0, 2, 0, 0], [0, 1, 2, 0, 0]],
        "dp2_sum": [1, 1, 5, 5],
        "single": [[0, 0, 1, 0, 0, rank] for rank in range(4)],
        "tp2_main": [[True, "torchrun", "gloo"]] + [[False, "torchrun", "gloo"]] * 3,
        "left_initialized": [False] * 4,
    }
    assert {key: [seen[rank][key] for rank in range(4)] for key in expected} == expected
