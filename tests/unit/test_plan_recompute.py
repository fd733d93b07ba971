"""The plan under activation checkpointing (launch/plan.py: activations, replay_bytes,
recompute_macs; the --dry-run line): hand computations on a small config, and the estimate's shape
against a direct count on the tiny model: the bytes glibc's allocator holds when the forward
returns (tests/helpers/memory.py), per mode."""
import gc
import os

import pytest
import torch

import models
from launch.plan import activations, meta_model, recompute_macs, replay_bytes
from launch.plan_report import format_plan
from models.moe import is_expert_param
from parallel.recompute import apply_activation_checkpointing
from tests.helpers.memory import in_use
from trainer.lm.task import lm_loss
from trainer.recipe import load_config

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LLM = os.path.join(ROOT, "recipes", "llm", "pretrain_tiny.yaml")
# 4 layers, all MoE (E 4, top-2, expert ffn 32, loop backend), d_model 64, vocab 260 (bytes); 2 x 16 tokens.
SMALL = ["model.d_model=64", "model.num_layers=4", "model.num_heads=4", "model.num_kv_heads=2", "moe.num_experts=4",
         "moe.top_k=2", "moe.expert_ffn_dim=32", "moe.backend=loop", "data.seq_len=16", "train.micro_batch_size=2"]
MODES = {"none": [], "block1": ["parallel.activation_checkpoint=block"],
         "block2": ["parallel.activation_checkpoint=block", "parallel.activation_checkpoint_every=2"],
         "moe_ffn": ["parallel.activation_checkpoint=moe_ffn"]}


def test_block_mode_by_hand():
    T, D, L = 32, 64, 4
    head = T * 260 * 4 * 2  # fp32 logits and their gradient
    none = activations(load_config(LLM, SMALL))
    full = (none.kept - head) // L  # every layer is alike: one layer's activations
    every1 = activations(load_config(LLM, SMALL + MODES["block1"]))
    assert every1.kept == L * T * D * 4 + head and every1.replay == 0  # fp32 block inputs only
    # Recomputing layer 3 holds the inputs of layers 0-2 and layer 3 in full (the head is freed by then).
    assert every1.peak() == 3 * T * D * 4 + full
    every2 = activations(load_config(LLM, SMALL + MODES["block2"]))
    assert every2.kept == 2 * T * D * 4 + 2 * full + head  # layers 0 and 2 checkpointed
    assert every2.recompute == 0  # layer 2 recomputes after layer 3 freed as much
    assert every1.peak() < none.peak() / 2 and every1.peak() < every2.peak() < none.peak()


def test_moe_ffn_and_replay_by_hand():
    T, K, F = 32, 2, 32
    none = activations(load_config(LLM, SMALL))
    moe_ffn = activations(load_config(LLM, SMALL + MODES["moe_ffn"]))
    assert none.kept - moe_ffn.kept == 4 * T * K * 2 * F * 4  # the loop backend's w1, w3 outputs per copy
    assert moe_ffn.recompute == 0  # one layer's intermediates < the logits freed before the layers' backward
    # ep=2, bf16: each checkpointed block keeps R = T·top_k rows received by each exchange,
    # fp32 dispatched and bf16 combined: 64 x 64 x (4 + 2) bytes.
    ep = load_config(LLM, SMALL + MODES["block1"] + ["parallel.ep=2", "train.dtype=bf16"], world_size=2)
    assert replay_bytes(ep, 0, T) == 64 * 64 * 6
    assert activations(ep).replay == 4 * 64 * 64 * 6
    assert activations(load_config(LLM, SMALL + ["parallel.ep=2"], world_size=2)).replay == 0  # none: no tape


def test_recompute_compute_and_dry_run_line():
    cfg = load_config(LLM, SMALL + MODES["block1"] + ["parallel.ep=2", "train.dtype=bf16"], world_size=2)
    model = meta_model(cfg)
    forward, again = recompute_macs(cfg, model)
    assert again == forward - model.output_weight.numel()  # every block once more, not the head
    moe_cfg = load_config(LLM, SMALL + MODES["moe_ffn"])
    experts = sum(p.numel() for n, p in model.named_parameters() if is_expert_param(n)) * 2 / 4  # top_k / E
    assert recompute_macs(moe_cfg, model) == (forward, experts)
    text = format_plan(cfg, 2, 2)
    line = next(x for x in text.splitlines() if x.startswith("activation checkpointing"))
    assert "(block): recomputes whole blocks, layers [0, 1, 2, 3] in backward" in line
    assert f"about +{again / (3 * forward):.1%} per step" in line
    assert "of which all-to-all rows kept for the recompute 98.30KB" in line  # 4 x 64 x 64 x 6 B
    assert "activation checkpointing" not in format_plan(load_config(LLM, SMALL + ["parallel.ep=2"], world_size=2), 2, 2)


def _held_after_forward(cfg) -> int:
    """Bytes the allocator holds when the forward of one micro batch returns (then backward)."""
    torch.manual_seed(0)
    model = apply_activation_checkpointing(models.build_model(cfg.model, cfg.moe), cfg.parallel)
    tokens = torch.randint(0, cfg.model.vocab_size, (cfg.train.micro_batch_size, cfg.data.seq_len + 1))
    lm_loss(model(tokens[:, :-1]), tokens[:, 1:]).backward()  # warm-up: lazily made buffers stay out
    gc.collect()
    base = in_use()
    loss = lm_loss(model(tokens[:, :-1]), tokens[:, 1:])
    held = in_use() - base
    loss.backward()
    return held


@pytest.mark.skipif(in_use() is None, reason="needs glibc's mallinfo2")
def test_estimate_against_a_direct_count_on_the_tiny_model():
    """Per mode the share of none's activations kept at the end of the forward, estimated and
    counted, within 0.15; the experts' intermediates (what moe_ffn drops) within 10%. The
    estimate's per-layer counts are 25-40% below what the tiny model holds, hence shares."""
    torch.set_num_threads(1)
    shape = ["data.seq_len=256", "model.max_seq_len=256", "train.micro_batch_size=4", "moe.backend=loop"]
    cfgs = {mode: load_config(LLM, shape + extra) for mode, extra in MODES.items()}
    est = {mode: activations(cfg).kept + activations(cfg).replay for mode, cfg in cfgs.items()}
    held = {mode: _held_after_forward(cfg) for mode, cfg in cfgs.items()}
    for counts in (est, held):
        assert counts["block1"] < 0.2 * counts["none"], counts  # far less than none
        assert counts["block1"] < counts["block2"] < counts["none"], counts
        assert counts["block1"] < counts["moe_ffn"] < counts["none"], counts
    for mode in MODES:
        assert est[mode] / est["none"] == pytest.approx(held[mode] / held["none"], abs=0.15), (mode, est, held)
    assert est["none"] - est["moe_ffn"] == pytest.approx(held["none"] - held["moe_ffn"], rel=0.1)
