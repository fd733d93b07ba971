"""train.engine / --launcher deepspeed without processes: validation, the launcher command, the
hostfile check, DeepSpeed's config and the plan's memory under ZeRO."""
import pytest

from launch.plan import memory_per_rank
from launch.spawn import NodeArgs, deepspeed_command, hostfile_problem
from trainer.config import ConfigError
from trainer.recipe import load_config

RECIPE = "recipes/llm/pretrain_tiny.yaml"


@pytest.mark.parametrize("overrides, message", [
    (["train.engine=deepspeed", "train.zero_stage=3"], "ZeRO-3 would partition the expert parameters"),
    (["train.engine=deepspeed", "train.zero_stage=0"], "train.zero_stage: 0 is not one of 1, 2, 3"),
    (["train.engine=deepspeed", "parallel.pp=2", "model.tie_embeddings=false"],
     "train.engine=deepspeed: not with parallel.pp=2"),
    (["train.engine=zero"], "train.engine: 'zero' is not one of native, deepspeed"),
])
def test_engine_validation_one_line(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(RECIPE, overrides, world_size=2)


def test_deepspeed_config_follows_the_recipe():
    from trainer.adapt.ds_engine import deepspeed_config

    cfg = load_config(RECIPE, ["train.engine=deepspeed", "train.zero_stage=1", "train.grad_accum_steps=4",
                               "train.dtype=bf16", "optim.grad_clip=0.5"])
    ds = deepspeed_config(cfg)
    assert ds["zero_optimization"] == {"stage": 1} and ds["bf16"] == {"enabled": True}
    assert ds["gradient_accumulation_steps"] == 4 and ds["managed_gradient_accumulation"] is False
    assert ds["gradient_clipping"] == 0.5 and ds["train_micro_batch_size_per_gpu"] == cfg.train.micro_batch_size


def test_deepspeed_command_one_node_and_hostfile():
    one = deepspeed_command(NodeArgs(nproc_per_node=2), "/r/config.yaml", "/r", None)
    assert one[1:4] == ["-m", "deepspeed.launcher.runner", "--num_gpus=2"]
    assert not any(a.startswith("--hostfile") for a in one)
    port = [a for a in one if a.startswith("--master_port=")]
    assert len(port) == 1 and int(port[0].split("=")[1]) > 0  # a free port, not 29500 for every job
    assert one[-7:] == ["--no_local_rank", "--module", "trainer.entry", "--config", "/r/config.yaml", "--run-dir", "/r"]
    multi = deepspeed_command(NodeArgs(nproc_per_node=8, nnodes=2, master_addr="10.0.0.1"), "/r/c.yaml", "/r",
                              "/r/checkpoints/step_00000010", hostfile="/h")
    for flag in ("--num_gpus=8", "--hostfile=/h", "--num_nodes=2", "--master_addr=10.0.0.1", "--master_port=29500"):
        assert flag in multi
    assert multi[-2:] == ["--resume", "/r/checkpoints/step_00000010"]


def test_hostfile_problem(tmp_path):
    hosts = tmp_path / "hosts"
    hosts.write_text("# nodes\nworker-0 slots=8\nworker-1 slots=4\n\n")
    assert hostfile_problem(str(hosts), 2, 4) is None
    assert "host worker-1 has fewer slots than --nproc-per-node 8" in hostfile_problem(str(hosts), 2, 8)
    assert "2 hosts for --nnodes 3" in hostfile_problem(str(hosts), 3, 1)
    assert "no such file" in hostfile_problem(str(tmp_path / "none"), 1, 1)
    hosts.write_text("worker-0 8\n")
    assert "expected 'HOST slots=N' lines" in hostfile_problem(str(hosts), 1, 1)


def test_plan_memory_under_zero():
    """ep == 1: ZeRO-2 partitions moments, master weights and gradients of everything over dp;
    ep > 1: the experts' share stays whole (fp32, own AdamW), 1/ep of them per rank."""
    total, experts, dp = 1000, 600, 4
    native = memory_per_rank(load_config(RECIPE), total, experts, dp)
    zero2 = memory_per_rank(load_config(RECIPE, ["train.engine=deepspeed"]), total, experts, dp)
    assert native["optimizer"] == 8 * total and zero2["optimizer"] == 8 * total // dp
    assert zero2["grads"] == 4 * total // dp and zero2["params"] == 4 * total + 4 * total // dp
    zero1_ep2 = memory_per_rank(load_config(RECIPE, ["train.engine=deepspeed", "train.zero_stage=1",
                                                     "parallel.ep=2"]), total, experts, dp)
    assert zero1_ep2["optimizer"] == 8 * (400 // dp + 300)
    assert zero1_ep2["grads"] == 4 * 400 + 4 * 300
