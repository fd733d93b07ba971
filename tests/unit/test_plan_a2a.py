"""The plan's expert-parallel all-to-all volume (launch/plan.py: a2a_rows, a2a_bytes, a2a_text)
against hand computations for small layouts, and the dtypes the formula assumes against the
model: under bf16 autocast the dispatched rows are fp32 and the experts' outputs bf16."""
import os
import re

import pytest
import torch

import models
from launch.plan import a2a_bytes, a2a_rows
from launch.plan_report import format_plan
from models.config import moe_layer_ids
from models.moe import moe_layers
from trainer.recipe import load_config

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LLM = os.path.join(ROOT, "recipes", "llm", "pretrain_tiny.yaml")
DIT = os.path.join(ROOT, "recipes", "dit", "pretrain_digits_moe.yaml")
# 2 layers, both MoE, E 4 top-2, d_model 64; 2 sequences of 16 tokens per micro step, 3 micro steps.
SMALL = ["model.d_model=64", "model.num_layers=2", "model.num_heads=4", "model.num_kv_heads=2", "moe.num_experts=4",
         "moe.top_k=2", "data.seq_len=16", "train.micro_batch_size=2", "train.grad_accum_steps=3",
         "train.dtype=bf16", "parallel.ep=2"]


def test_a2a_bytes_by_hand_without_pipeline():
    cfg = load_config(LLM, SMALL, world_size=2)
    T = 2 * 16  # tokens of one micro step on a rank
    # R = T·top_k = 64 rows of 64 values; half of them cross (ep 2); x2: forward and backward.
    dispatch_per_layer = 2 * 64 * 64 * 4 // 2  # fp32 rows: 16384
    combine_per_layer = 2 * 64 * 64 * 2 // 2  # bf16 expert outputs: 8192
    assert a2a_rows(cfg, 0, T) == 64
    assert a2a_bytes(cfg, [0], T) == {"dispatch": 16384, "combine": 8192, "total": 24576}
    assert a2a_bytes(cfg, [0, 1], T)["total"] == 2 * (dispatch_per_layer + combine_per_layer)
    text = format_plan(cfg, 2, 2)
    assert ("per MoE layer and microbatch: dispatch 16.38KB (fp32) + combine 8.19KB (bf16) = 24.58KB; "
            "2 x R x d_model 64 x (4 + 2) B x (ep-1)/ep 1/2, R = 64 rows (32 tokens x top_k 2)") in text
    # Per step: 2 MoE layers x 3 micro steps x 24576 B = 147456 B.
    assert "per step, each rank: 147.46KB (2 MoE layers x 3 microbatches)" in text


def test_a2a_bytes_by_hand_per_pipeline_rank():
    # pp 2 x dp 2 (ep 2): each pipeline rank holds one MoE layer; 2 microbatches of 1 sequence.
    cfg = load_config(LLM, SMALL + ["parallel.pp=2", "parallel.pp_microbatches=2", "train.dtype=fp32"],
                      world_size=4)
    # Per layer and microbatch: R = 16 tokens x 2 = 32 rows, 2 x 32 x 64 x (4 + 4) B / 2 = 16384 B;
    # per step 1 layer x (2 microbatches x 3 micro steps) = 98304 B on each pipeline rank.
    text = format_plan(cfg, 4, 4)
    assert "dispatch 8.19KB (fp32) + combine 8.19KB (fp32) = 16.38KB" in text
    assert "R = 32 rows (16 tokens x top_k 2)" in text
    assert "per step, pp ranks 0-1: 98.30KB (1 MoE layer x 6 microbatches)" in text


def test_a2a_rows_with_capacity_and_expert_choice():
    T = 32
    padded = load_config(LLM, SMALL + ["moe.capacity_factor=1.5", "moe.pad_to_capacity=true"], world_size=2)
    assert a2a_rows(padded, 0, T) == 4 * 24  # E x C, C = ceil(32 x 2 x 1.5 / 4) = 24
    dropping = load_config(LLM, SMALL + ["moe.capacity_factor=1.5"], world_size=2)
    assert a2a_rows(dropping, 0, T) == 64  # at most T·top_k rows are kept
    tight = load_config(LLM, SMALL + ["moe.capacity_factor=0.5"], world_size=2)
    assert a2a_rows(tight, 0, T) == 4 * 8  # C = ceil(32 x 2 x 0.5 / 4) = 8 per expert
    assert "(32 tokens x top_k 2, capacity)" in format_plan(tight, 2, 2)


def test_dit_tokens_are_patches():
    cfg = load_config(DIT, ["parallel.ep=2", "train.micro_batch_size=4"], world_size=2)
    tokens = (cfg.model.image_size // cfg.model.patch_size) ** 2  # 8x8 digits, 2x2 patches: 16
    assert tokens == 16
    text = format_plan(cfg, 2, 2)
    assert f"batch: 8 images x {tokens} tokens per step" in text
    rows = 4 * tokens * cfg.moe.top_k
    assert f"R = {rows} rows ({4 * tokens} tokens x top_k {cfg.moe.top_k})" in text
    assert a2a_bytes(cfg, moe_layer_ids(cfg.model, cfg.moe), 4 * tokens)["total"] == \
        len(moe_layer_ids(cfg.model, cfg.moe)) * 2 * rows * cfg.model.d_model * (4 + 4) // 2


def test_no_all_to_all_without_expert_parallelism():
    cfg = load_config(LLM, SMALL[:-1], world_size=2)
    assert "expert all-to-all" not in format_plan(cfg, 2, 2)


@pytest.mark.parametrize("recipe", [LLM, DIT])
def test_dispatched_rows_are_fp32_and_expert_outputs_bf16_under_autocast(recipe):
    """The b_in = 4, b_out = 2 of the formula: what the dispatcher moves under bf16 autocast."""
    cfg = load_config(recipe, [])
    torch.manual_seed(0)
    model = models.build_model(cfg.model, cfg.moe)
    seen = []
    for layer in moe_layers(model):
        layer.experts.register_forward_hook(lambda mod, args, out: seen.append((args[0].dtype, out.dtype)))
    if cfg.model.family == "dit":
        s, c = cfg.model.image_size, cfg.model.in_channels
        inputs = (torch.randn(2, c, s, s), torch.rand(2) * 999, torch.tensor([1, 2]))
    else:
        inputs = (torch.randint(0, 200, (2, 16)),)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(*inputs)
    assert seen and set(seen) == {(torch.float32, torch.bfloat16)}
