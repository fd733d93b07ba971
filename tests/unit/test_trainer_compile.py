"""parallel.compile through the Trainer: every block and the LM loss are compiled (aot_eager here:
dynamo and AOT autograd trace exactly what inductor would, without generating kernels), the losses
are the eager run's, and what it cannot combine with is refused in one line. Inductor's kernels run
in the GPU suite (benchmarks/gpu_suite.py, docs/gpu.md)."""
import json
import os

import pytest
import torch

from trainer.lm.task import lm_loss
from trainer.loop import Trainer
from trainer.recipe import load_config

COMMON = ["train.micro_batch_size=2", "train.steps=3", "train.log_every=1", "eval.every=0", "checkpoint.enabled=false",
          "logging.wandb=false", "logging.progress_bar=false", "logging.heatmap_every=0", "optim.warmup_steps=0"]
LM = ["data.max_bytes=100000", "data.seq_len=32", "model.d_model=32", "model.num_layers=2", "moe.expert_ffn_dim=32",
      "optim.lr=0.01"]


def _run(tmp_path, name, recipe, overrides):
    run_dir = tmp_path / name
    os.makedirs(run_dir)
    torch.set_num_threads(1)
    trainer = Trainer(load_config(recipe, COMMON + overrides), str(run_dir))
    trainer.run()
    with open(run_dir / "metrics.jsonl") as f:
        return trainer, [r["loss"] for r in map(json.loads, f) if "loss" in r]


@pytest.mark.parametrize("mode", ["none", "moe_ffn"])
def test_compiled_lm_trains_like_eager(tmp_path, mode):
    extra = LM + [f"parallel.activation_checkpoint={mode}"]
    _, eager = _run(tmp_path, "eager", "recipes/llm/pretrain_tiny.yaml", extra)
    trainer, compiled = _run(tmp_path, "compiled", "recipes/llm/pretrain_tiny.yaml",
                             extra + ["parallel.compile=true", "parallel.compile_backend=aot_eager"])
    layers = list(trainer.unwrapped_model.layers.values())
    if mode == "none":  # each block compiled whole
        assert all(block._compiled_call_impl is not None for block in layers)
    else:  # part by part around the region checkpointed inside each block (parallel/compile.py)
        assert all(block._compiled_call_impl is None and block.attn._compiled_call_impl is not None
                   for block in layers)
    assert trainer.task.loss_fn is not lm_loss
    assert len(compiled) == len(eager) == 3
    assert compiled == pytest.approx(eager, rel=1e-5)


def test_compiled_dit_trains_like_eager(tmp_path):
    extra = ["train.steps=2", "model.num_layers=2", "diffusion.num_samples=4"]
    _, eager = _run(tmp_path, "eager", "recipes/dit/pretrain_digits_moe.yaml", extra)
    _, compiled = _run(tmp_path, "compiled", "recipes/dit/pretrain_digits_moe.yaml",
                       extra + ["parallel.compile=true", "parallel.compile_backend=aot_eager"])
    assert len(compiled) == 2 and compiled == pytest.approx(eager, rel=1e-5)


@pytest.mark.parametrize("extra, message", [
    (["parallel.pp=2"], "parallel.compile: not with pipeline parallelism"),
    (["train.engine=deepspeed"], "train.engine=deepspeed: not with parallel.compile"),
])
def test_compile_refuses_what_it_cannot_combine_with(extra, message):
    from models.config import ConfigError
    from trainer.config import validate

    with pytest.raises(ConfigError, match=message):
        validate(load_config("recipes/llm/pretrain_tiny.yaml", ["parallel.compile=true"] + extra), world_size=2)


def test_compiled_fp32_grouped_gemm_runs_on_the_loop():
    """torch's meta kernel of _grouped_mm takes bf16 only, so a traced fp32 layer would fail to
    compile: it runs on the loop instead, with the same numbers."""
    from models.config import MoEConfig
    from models.moe import MoE

    torch.manual_seed(0)
    layer = MoE(16, MoEConfig(num_experts=4, top_k=2, expert_ffn_dim=32, backend="grouped_mm"))
    layer.init_weights(0.3, 0.3)
    x = torch.randn(2, 6, 16)
    eager = layer(x)
    layer.compile(backend="aot_eager")
    torch.testing.assert_close(layer(x), eager)
