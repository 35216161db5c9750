"""Launch errors: no torchrun environment, and a world that does not fit TP×PP."""

import pytest

from megatron_cropi.parallel import LaunchError, check_layout, init_distributed


def test_launch_without_torchrun_env_says_how_to_launch(monkeypatch):
    import torch.distributed as dist

    # other unit tests may have started a one-process group in this interpreter; pretend there is none
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(LaunchError) as info:
        init_distributed()
    msg = str(info.value)
    assert "torchrun" in msg and "--nproc-per-node" in msg and "RANK" in msg


def test_partial_torchrun_env_names_the_missing_variables(monkeypatch):
    import torch.distributed as dist

    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    for var in ("LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(LaunchError, match="MASTER_ADDR"):
        init_distributed(allow_single=True)  # a partial env is never silently replaced


def test_a_one_process_world_starts_again_after_one_ended_in_the_same_process(monkeypatch):
    """A one-process world sets RANK/WORLD_SIZE/LOCAL_RANK (no MASTER_*); once it is destroyed, the next
    ``cropi`` call in the same Python process (the API, a test) starts a one-process world again
    instead of reading the leftovers as a partial torchrun environment."""
    import torch.distributed as dist

    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    started = []
    monkeypatch.setattr(dist, "init_process_group", lambda **kw: started.append(kw))
    for var, value in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0")):
        monkeypatch.setenv(var, value)
    for var in ("MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    init_distributed(allow_single=True)
    assert len(started) == 1 and started[0]["world_size"] == 1 and started[0]["rank"] == 0
    with pytest.raises(LaunchError, match="MASTER_ADDR"):
        init_distributed()  # only where a one-process world is allowed


@pytest.mark.parametrize("world, tp, pp, dp", [(1, 1, 1, 1), (4, 2, 2, 1), (8, 2, 2, 2), (16, 8, 1, 2)])
def test_layouts_that_fit(world, tp, pp, dp):
    assert check_layout(world, tp, pp) == dp


@pytest.mark.parametrize("world, tp, pp", [(6, 2, 2), (3, 2, 1), (2, 1, 4)])
def test_world_not_divisible_by_tp_pp(world, tp, pp):
    with pytest.raises(LaunchError) as info:
        check_layout(world, tp, pp)
    assert f"world size {world} is not divisible by TP×PP = {tp}×{pp}" in str(info.value)
    assert "--nproc-per-node" in str(info.value)
