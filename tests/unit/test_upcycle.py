"""Upcycling: a dense checkpoint in our real format -> an MoE model that computes the same logits."""
from __future__ import annotations

import os
from unittest import mock

import pytest
import torch

import models
from models.moe import moe_layers
from models.moe.upcycle import UpcycleError, upcycle_state_dict
from parallel import build_mesh
from trainer.checkpoint import save_checkpoint
from models.config import MoEConfig
from trainer.config import ConfigError
from trainer.recipe import load_config
from trainer.optim import build_optimizer, build_scheduler
from trainer.adapt.upcycle import check_upcycle_source, load_dense_checkpoint, upcycle_into

# init_std 0.1 (not 0.02): the FFN branch must matter in the logits for the parity to mean much.
SHAPES = ["model.vocab_size=64", "model.d_model=32", "model.num_layers=2", "model.num_heads=4",
          "model.num_kv_heads=2", "model.max_seq_len=32", "model.init_std=0.1", "data.seq_len=16"]
DENSE = SHAPES + ["model.ffn_dim=64", "moe.num_experts=0"]
MOE = SHAPES + ["moe.num_experts=4", "moe.top_k=2", "moe.expert_ffn_dim=64", "moe.renormalize=true",
                "moe.num_shared_experts=0"]


class _Data:
    def state_dict(self) -> dict:
        return {"position": 0}


def _build(overrides):
    cfg = load_config(None, overrides)
    torch.manual_seed(1)
    return cfg, models.build_model(cfg.model, cfg.moe).eval()


@pytest.fixture(scope="module")
def dense_ckpt(tmp_path_factory):
    """(checkpoint path, dense model) saved by the trainer's own save_checkpoint, one process."""
    cfg, dense = _build(DENSE)
    optimizer = build_optimizer(dense, cfg.optim)
    scheduler = build_scheduler(optimizer, cfg.train.steps, cfg.optim)
    with mock.patch.dict(os.environ):
        for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
            os.environ.pop(var, None)
        mesh = build_mesh(cfg.parallel, torch.device("cpu"))
    run_dir = str(tmp_path_factory.mktemp("dense_run"))
    path = save_checkpoint(run_dir, 5, dense, optimizer, scheduler, _Data(), cfg, mesh)
    return path, dense


def _logits(model, tokens):
    with torch.no_grad():
        return model(tokens)


def _tokens():
    return torch.randint(0, 64, (3, 24), generator=torch.Generator().manual_seed(0))


def test_load_dense_checkpoint_reads_every_weight(dense_ckpt):
    path, dense = dense_ckpt
    cfg, sd = load_dense_checkpoint(path)
    assert cfg.moe.num_experts == 0 and cfg.model.ffn_dim == 64
    expected = dense.state_dict()
    assert sd.keys() == expected.keys()
    for key, value in expected.items():
        torch.testing.assert_close(sd[key], value, rtol=0, atol=0)


def test_upcycled_moe_equals_dense(dense_ckpt):
    path, dense = dense_ckpt
    cfg, moe = _build(MOE + [f"model.upcycle_from={path}"])
    check_upcycle_source(path, cfg)
    tokens = _tokens()
    assert not torch.allclose(_logits(moe, tokens), _logits(dense, tokens), atol=1e-3)  # not already equal
    line = upcycle_into(moe, path, seed=cfg.train.seed)
    assert "2 MoE layers" in line
    torch.testing.assert_close(_logits(moe, tokens), _logits(dense, tokens), rtol=1e-4, atol=1e-5)

    dense_sd = dense.state_dict()
    for i, layer in enumerate(moe_layers(moe)):
        w = {n: dense_sd[f"layers.{i}.ffn.{n}.weight"] for n in ("w1", "w2", "w3")}
        for e in range(4):  # every expert is the dense FFN of its layer
            torch.testing.assert_close(layer.experts.w1_EFD[e], w["w1"], rtol=0, atol=0)
            torch.testing.assert_close(layer.experts.w3_EFD[e], w["w3"], rtol=0, atol=0)
            torch.testing.assert_close(layer.experts.w2_EDF[e], w["w2"], rtol=0, atol=0)
        gate = layer.router.gate.weight
        assert abs(gate.mean().item()) < 0.005 and abs(gate.std().item() - 0.02) < 0.005
    for key in ("tok_embeddings.weight", "layers.1.attn.wq.weight", "layers.0.ffn_norm.weight", "output.weight"):
        torch.testing.assert_close(moe.state_dict()[key], dense_sd[key], rtol=0, atol=0)

    # Same seed, same router on every rank; another seed, another router.
    _, again = _build(MOE)
    upcycle_into(again, path, seed=cfg.train.seed)
    torch.testing.assert_close(again.layers["0"].ffn.router.gate.weight, moe.layers["0"].ffn.router.gate.weight)
    upcycle_into(again, path, seed=cfg.train.seed + 1)
    assert not torch.equal(again.layers["0"].ffn.router.gate.weight, moe.layers["0"].ffn.router.gate.weight)


def test_granular_upcycling_equals_dense(dense_ckpt):
    path, dense = dense_ckpt
    cfg, moe = _build(MOE + ["moe.expert_ffn_dim=32", "model.upcycle_granularity=2"])
    check_upcycle_source(path, cfg)
    upcycle_into(moe, path, granularity=2)
    tokens = _tokens()
    torch.testing.assert_close(_logits(moe, tokens), _logits(dense, tokens), rtol=1e-4, atol=1e-5)
    layer, w1 = moe.layers["0"].ffn, dense.layers["0"].ffn.w1.weight
    torch.testing.assert_close(layer.experts.w1_EFD[2], w1[:32], rtol=0, atol=0)  # expert 2: piece 0
    torch.testing.assert_close(layer.experts.w1_EFD[3], w1[32:], rtol=0, atol=0)  # expert 3: piece 1
    gate = layer.router.gate.weight
    torch.testing.assert_close(gate[0], gate[1], rtol=0, atol=0)  # a virtual group routes as one
    assert not torch.equal(gate[0], gate[2])


def test_shared_expert_of_dense_width_keeps_parity(dense_ckpt):
    path, dense = dense_ckpt
    _, moe = _build(MOE + ["moe.num_shared_experts=1", "moe.shared_expert_ffn_dim=64"])
    line = upcycle_into(moe, path)
    assert "shared experts: the dense FFN" in line
    tokens = _tokens()
    torch.testing.assert_close(_logits(moe, tokens), _logits(dense, tokens), rtol=1e-4, atol=1e-5)
    if hasattr(MoEConfig(), "shared_expert_gate"):  # the gated variant (Qwen2-MoE)
        _, gated = _build(MOE + ["moe.num_shared_experts=1", "moe.shared_expert_ffn_dim=64",
                                 "moe.shared_expert_gate=true"])
        upcycle_into(gated, path)
        torch.testing.assert_close(_logits(gated, tokens), _logits(dense, tokens), rtol=1e-4, atol=1e-5)


def test_shared_expert_of_other_width_keeps_its_init(dense_ckpt):
    path, _ = dense_ckpt
    _, moe = _build(MOE + ["moe.num_shared_experts=1", "moe.shared_expert_ffn_dim=16"])
    before = moe.layers["0"].ffn.shared_experts.w1.weight.clone()
    assert "own init" in upcycle_into(moe, path)
    torch.testing.assert_close(moe.layers["0"].ffn.shared_experts.w1.weight, before, rtol=0, atol=0)


def _variant(*overrides):
    """A routing variant of MOE; skipped where MoEConfig (another work item) lacks its keys."""
    fields = MoEConfig.__dataclass_fields__
    missing = [o for o in overrides if o.startswith("moe.") and o.split("=")[0][4:] not in fields]
    return pytest.param(list(overrides), marks=pytest.mark.skipif(bool(missing), reason=f"no {missing}"))


@pytest.mark.parametrize("overrides", [
    _variant("moe.routed_scaling_factor=2.5", "moe.aux_free=true"),
    _variant("moe.score_func=sigmoid"),
    _variant("moe.num_groups=2", "moe.topk_group=1", "moe.expert_ffn_dim=32", "model.upcycle_granularity=2"),
])
def test_parity_with_renormalised_router_variants(dense_ckpt, overrides):
    path, dense = dense_ckpt
    cfg, moe = _build(MOE + overrides)
    upcycle_into(moe, path, granularity=cfg.model.upcycle_granularity)
    tokens = _tokens()
    torch.testing.assert_close(_logits(moe, tokens), _logits(dense, tokens), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("overrides", [_variant("moe.renormalize=false"),
                                       _variant("moe.renormalize=false", "moe.score_func=sigmoid")])
def test_raw_scores_are_rescaled_for_a_uniform_router(dense_ckpt, overrides):
    path, dense = dense_ckpt
    _, moe = _build(MOE + overrides)
    _, dense_sd = load_dense_checkpoint(path)
    # A zero router is uniform: each chosen weight is 1/E (softmax) or 1/2 (sigmoid), and w2
    # carries the inverse of their sum.
    moe.load_state_dict(upcycle_state_dict(dense_sd, moe, router_std=0.0))
    tokens = _tokens()
    torch.testing.assert_close(_logits(moe, tokens), _logits(dense, tokens), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("override, message", [
    ("moe.expert_ffn_dim=48", "layers.0.ffn.experts.w1_EFD: expert ffn dim 48 × granularity 1 = 48 "
                              "does not match the dense ffn dim 64"),
    ("model.vocab_size=80", "tok_embeddings.weight: dense checkpoint has shape [64, 32], "
                            "the MoE model expects [80, 32]"),
    ("model.num_layers=3", "layers.2.ffn.w1.weight: missing from the dense checkpoint"),
])
def test_shape_mismatch_is_one_line(dense_ckpt, override, message):
    path, _ = dense_ckpt
    _, dense_sd = load_dense_checkpoint(path)
    _, moe = _build(MOE + [override])
    with pytest.raises(UpcycleError) as err:
        upcycle_state_dict(dense_sd, moe)
    assert str(err.value) == message
    with pytest.raises(ConfigError, match=r"^model\.upcycle_from: ") as err:
        upcycle_into(moe, path)
    assert "\n" not in str(err.value)


def test_expert_ffn_hint_names_the_granularity(dense_ckpt):
    path, _ = dense_ckpt
    _, dense_sd = load_dense_checkpoint(path)
    _, moe = _build(MOE + ["moe.expert_ffn_dim=32"])
    with pytest.raises(UpcycleError, match="granularity=2 would upcycle it granularly"):
        upcycle_state_dict(dense_sd, moe)


@pytest.mark.parametrize("override, message", [
    ("model.d_model=64", "model.d_model: the dense checkpoint has 32, this model has 64"),
    ("model.vocab_size=80", "model.vocab_size: the dense checkpoint has 64, this model has 80"),
    ("moe.expert_ffn_dim=48", "moe.expert_ffn_dim: 48 × model.upcycle_granularity 1 does not match "
                              "the dense checkpoint's model.ffn_dim=64"),
    ("moe.first_k_dense=1", "model.ffn_dim: the dense checkpoint has 64, this model's dense FFN layers have 512"),
])
def test_preflight_compares_shapes(dense_ckpt, override, message):
    path, _ = dense_ckpt
    cfg = load_config(None, MOE + [override])  # model.ffn_dim stays 512: only dense layers use it
    with pytest.raises(ConfigError) as err:
        check_upcycle_source(path, cfg)
    assert str(err.value) == message


def test_preflight_refuses_a_non_checkpoint(tmp_path, dense_ckpt):
    with pytest.raises(ConfigError, match="checkpoint directory not found"):
        check_upcycle_source(str(tmp_path / "missing"))
    with pytest.raises(ConfigError, match="is not a complete checkpoint"):
        check_upcycle_source(str(tmp_path))
    assert check_upcycle_source(dense_ckpt[0]).model.ffn_dim == 64


def test_config_validation():
    with pytest.raises(ConfigError, match="model.upcycle_from: needs an MoE model"):
        load_config(None, DENSE + ["model.upcycle_from=/x"])
    with pytest.raises(ConfigError, match="model.upcycle_granularity=3 must divide"):
        load_config(None, MOE + ["model.upcycle_from=/x", "model.upcycle_granularity=3"])
