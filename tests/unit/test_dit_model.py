"""DiT / DiT-MoE model: shapes, adaLN-Zero init, conditioning, guidance, pipeline stages, meta
build, MoE aux loss and statistics, presets, upcycling."""
from __future__ import annotations

import math

import pytest
import torch

from models import build_model, param_counts
from models.dit import DiT, sincos_2d_pos_embed, timestep_embedding, unpatchify
from models.moe import moe_layers, pop_router_stats
from models.moe.upcycle import upcycle_state_dict
from models.registry import preset_overrides
from models.config import MoEConfig, ModelConfig
from models.init import initialize

# Small shapes for CPU: 8x8 images, 2x2 patches (16 tokens), D 32.
SMALL = dict(family="dit", d_model=32, num_layers=2, num_heads=4, num_kv_heads=4, ffn_dim=64, norm_eps=1e-6,
             image_size=8, patch_size=2, in_channels=1, num_classes=10, class_dropout_prob=0.1)
MOE = dict(num_experts=4, top_k=2, expert_ffn_dim=32, num_shared_experts=1, shared_expert_ffn_dim=32,
           renormalize=False, aux_loss_coeff=0.0, z_loss_coeff=0.0, expert_balance_loss_coeff=0.01)


def small_dit(num_experts=4, seed=0, moe=(), **model_kw):
    torch.manual_seed(seed)
    moe_cfg = MoEConfig(**{**MOE, "num_experts": num_experts, **dict(moe)})
    return DiT(ModelConfig(**{**SMALL, **model_kw}), moe_cfg)


def preset(name, **model_kw):
    p = preset_overrides(name)
    return ModelConfig(**{**p["model"], **model_kw}), MoEConfig(**p["moe"])


def inputs(B=3, C=1, size=8, num_classes=10, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, C, size, size, generator=g)
    t = torch.randint(0, 1000, (B,), generator=g).float()
    y = torch.randint(0, num_classes, (B,), generator=g)
    return x, t, y


@torch.no_grad()
def perturb(model, std=0.1, seed=2):
    """Noise on every weight: leaves the zero-init (identity) regime so comparisons mean something."""
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.add_(torch.randn(p.shape, generator=g) * std)


@pytest.mark.parametrize("learn_sigma", [True, False])
@pytest.mark.parametrize("num_experts", [0, 4])
def test_output_shape(learn_sigma, num_experts):
    model = small_dit(num_experts, learn_sigma=learn_sigma, in_channels=3)
    out = model(*inputs(C=3))
    assert out.shape == (3, 6 if learn_sigma else 3, 8, 8) and out.dtype == torch.float32
    assert len(moe_layers(model)) == (2 if num_experts else 0)


def test_init_output_is_zero_and_blocks_are_identity():
    model = small_dit().eval()
    x, t, y = inputs()
    assert torch.equal(model(x, t, y), torch.zeros(3, 2, 8, 8))
    h = torch.randn(3, 16, 32)
    c = torch.randn(3, 32)
    for block in model.layers.values():
        assert torch.equal(block(h, c), h)


def test_one_sgd_step_makes_output_nonzero():
    model = small_dit().train()
    x, t, y = inputs()
    loss = (model(x, t, y) - torch.randn(3, 2, 8, 8)).square().mean()
    loss.backward()
    torch.optim.SGD(model.parameters(), lr=0.1).step()
    with torch.no_grad():
        assert model.eval()(x, t, y).abs().max() > 1e-4


def test_pos_embed_2x2_against_formula():
    D = 8  # per axis: sin(p·ω_0), sin(p·ω_1), cos(p·ω_0), cos(p·ω_1) with ω_j = 10000^(-j/2)
    omega = [1.0, 1e-2]

    def axis(p):
        return [math.sin(p * w) for w in omega] + [math.cos(p * w) for w in omega]

    # Token index = row·2 + col; the first half encodes the column, the second the row (DiT/MAE).
    expected = torch.tensor([axis(col) + axis(row) for row in range(2) for col in range(2)])
    torch.testing.assert_close(sincos_2d_pos_embed(D, 2), expected)
    model = small_dit(image_size=4)  # 2x2 tokens of 2x2 patches
    torch.testing.assert_close(model.positions.table, sincos_2d_pos_embed(32, 2))
    assert not any("positions" in k for k in model.state_dict())


def test_timestep_embedding_formula():
    emb = timestep_embedding(torch.tensor([0.0, 500.0]), 256)
    assert emb.shape == (2, 256)
    torch.testing.assert_close(emb[0], torch.cat([torch.ones(128), torch.zeros(128)]))
    f3 = math.exp(-math.log(10000) * 3 / 128)
    torch.testing.assert_close(emb[1, [3, 128 + 3]], torch.tensor([math.cos(500 * f3), math.sin(500 * f3)]))


def test_patch_token_order_matches_unpatchify():
    model = small_dit(num_experts=0)
    x = torch.zeros(1, 1, 8, 8)
    x[0, 0, 2:4, 4:6] = 1.0  # grid row 1, column 2 -> token 1·4 + 2
    changed = (model.x_embedder(x) - model.x_embedder.proj.bias).abs().sum(-1)[0]
    assert changed.nonzero().flatten().tolist() == [6]
    patches = torch.arange(16 * 4 * 2.0).view(1, 16, 8)  # [B, T, p·p·C] with C = 2
    img = unpatchify(patches, 2, 2)
    assert img.shape == (1, 2, 8, 8)
    # token 6, patch position (1, 0), channel 1 -> value index (1·2 + 0)·2 + 1 = 5
    assert img[0, 1, 2 + 1, 4 + 0] == patches[0, 6, 5]


def test_label_dropout_rate_in_training_only():
    model = small_dit(num_experts=0, class_dropout_prob=0.25)
    y = torch.randint(0, 10, (20000,))
    torch.manual_seed(3)
    dropped = (model.y_embedder.drop_labels(y) == 10).float().mean().item()
    assert dropped == pytest.approx(0.25, abs=0.015)
    kept = model.y_embedder.drop_labels(y)
    assert torch.equal(kept[kept != 10], y[kept != 10])  # the others are untouched
    model.eval()
    assert torch.equal(model.y_embedder.drop_labels(y), y)


def test_forward_with_cfg():
    model = small_dit()
    perturb(model)
    model.eval()
    x, t, y = inputs()
    with torch.no_grad():
        cond = model(x, t, y)
        uncond = model(x, t, torch.full_like(y, 10))
        assert not torch.allclose(cond, uncond, atol=1e-3)
        torch.testing.assert_close(model.forward_with_cfg(x, t, y, 1.0), cond)
        torch.testing.assert_close(model.forward_with_cfg(x, t, y, 4.0), uncond + 4.0 * (cond - uncond))


@pytest.mark.parametrize("split", [[[0, 1], [2, 3]], [[0], [1, 2], [3]], [[0, 1, 2, 3]]])
def test_pipeline_stages_reproduce_forward(split):
    model = small_dit(num_layers=4)
    perturb(model)
    model.eval()
    x, t, y = inputs()
    stages = [model.pipeline_stage(ids, first=s == 0, last=s == len(split) - 1) for s, ids in enumerate(split)]
    with torch.no_grad():
        out = stages[0](x, t, y)
        for stage in stages[1:]:
            out = stage(*out)
        torch.testing.assert_close(out, model(x, t, y), rtol=0, atol=0)
    params = dict(model.named_parameters())
    names = set()
    for stage in stages:
        for name, p in stage.named_parameters():
            assert params[name] is p
            names.add(name)
    assert names == set(params)


def test_pipeline_stage_gradients_match_model():
    model = small_dit(num_layers=4, moe={"expert_balance_loss_coeff": 0.0}, class_dropout_prob=0.0)
    perturb(model)
    x, t, y = inputs()
    model(x, t, y).square().sum().backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    first, last = model.pipeline_stage([0, 1], True, False), model.pipeline_stage([2, 3], False, True)
    h, c = first(x, t, y)
    h_in, c_in = h.detach().requires_grad_(), c.detach().requires_grad_()
    last(h_in, c_in).square().sum().backward()
    torch.autograd.backward([h, c], [h_in.grad, c_in.grad])  # what a pipeline runtime does
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, expected[n], msg=n)


def test_meta_build_then_materialise():
    model_cfg, moe_cfg = preset("dit_tiny_moe")
    with torch.device("meta"):
        model = build_model(model_cfg, moe_cfg)
    assert isinstance(model, DiT) and all(p.is_meta for p in model.parameters())
    model.to_empty(device="cpu")
    initialize(model, seed=0)
    torch.testing.assert_close(model.positions.table, sincos_2d_pos_embed(128, 4))
    out = model(*inputs())
    assert torch.equal(out, torch.zeros_like(out))
    # initialize alone sets every weight: same seed, same state as a model built on the CPU.
    reference = build_model(model_cfg, moe_cfg, seed=0)
    for (name, a), b in zip(model.state_dict().items(), reference.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
    std = model.layers["0"].ffn.experts.w1_EFD.std().item()
    assert std == pytest.approx(model_cfg.init_std, rel=0.05)


@pytest.mark.parametrize("coeff", [0.01, 0.0])
def test_moe_stats_and_balance_loss_reach_router(coeff):
    model = small_dit(moe={"expert_balance_loss_coeff": coeff}).train()
    model(*inputs()).square().mean().backward()
    # At init every block's gate is zero, so the diffusion loss gives the router no gradient:
    # a non-zero router gradient can only come from the attached balance loss.
    for layer in moe_layers(model):
        grad = layer.router.gate.weight.grad
        assert (grad is not None and grad.abs().sum() > 0) == (coeff > 0)
    stats = pop_router_stats(model)
    assert {"moe/load_max_over_mean", "moe/router_entropy", "moe/layer1/load_max_over_mean"} <= set(stats)
    assert ("moe/expert_balance_loss" in stats) == (coeff > 0)
    assert "moe/aux_loss" not in stats and "moe/z_loss" not in stats
    assert [layer.moe_index for layer in moe_layers(model)] == [0, 1]


def test_tiny_presets_active_params():
    moe_model_cfg, moe_cfg = preset("dit_tiny_moe")
    dense_model_cfg, dense_moe_cfg = preset("dit_tiny_dense")
    moe_total, moe_active = param_counts(build_model(moe_model_cfg, moe_cfg), moe_cfg)
    dense_total, dense_active = param_counts(build_model(dense_model_cfg, dense_moe_cfg), dense_moe_cfg)
    assert (moe_total, moe_active, dense_total) == (2_519_560, 1_339_912, 1_335_816)
    # Equal FFN work per token; the MoE model also has its router (E·D per layer).
    assert moe_active - dense_active == moe_model_cfg.num_layers * moe_cfg.num_experts * moe_model_cfg.d_model


@pytest.mark.parametrize("name,published", [("dit_S", 33e6), ("dit_B", 130e6), ("dit_L", 458e6), ("dit_XL", 675e6)])
def test_dit_preset_sizes_on_meta(name, published):
    model_cfg, moe_cfg = preset(name)
    with torch.device("meta"):
        total, _ = param_counts(build_model(model_cfg, moe_cfg), moe_cfg)
    # Our SwiGLU FFN has a third 4D x D matrix where DiT's GELU MLP has two.
    swiglu_extra = model_cfg.num_layers * 4 * model_cfg.d_model ** 2
    assert total - swiglu_extra == pytest.approx(published, rel=0.01)


def test_dit_moe_sizes_on_meta():
    model_cfg, moe_cfg = preset("dit_moe_XL_8E2A")
    with torch.device("meta"):
        total, active = param_counts(build_model(model_cfg, moe_cfg), moe_cfg)
    assert (total, active) == (4_167_869_216, 1_492_427_552)
    # The same structure at DiT-MoE-G/2-16E2A shapes gives its published 16.5B.
    D = 1408
    g_model = ModelConfig(**{**preset_overrides("dit_moe_XL_8E2A")["model"], "d_model": D, "num_layers": 40})
    g_moe = MoEConfig(**{**preset_overrides("dit_moe_XL_8E2A")["moe"], "num_experts": 16,
                         "expert_ffn_dim": 4 * D, "shared_expert_ffn_dim": D})
    with torch.device("meta"):
        total, _ = param_counts(build_model(g_model, g_moe), g_moe)
    assert total == pytest.approx(16.5e9, rel=0.005)


@pytest.mark.parametrize("moe,router_std", [
    ({"renormalize": True, "num_shared_experts": 0}, 0.02),  # exact for any router
    ({"renormalize": False, "num_shared_experts": 1}, 0.0),  # DiT-MoE style: exact while uniform
])
def test_upcycle_dense_dit_into_moe(moe, router_std):
    dense = small_dit(num_experts=0, init_std=0.1)
    perturb(dense, std=0.05)
    dense.eval()
    upcycled = small_dit(seed=5, init_std=0.1, moe={"expert_ffn_dim": 64, "shared_expert_ffn_dim": 64, **moe}).eval()
    x, t, y = inputs()
    with torch.no_grad():
        expected = dense(x, t, y)
        assert not torch.allclose(upcycled(x, t, y), expected, atol=1e-3)
        sd = upcycle_state_dict(dense.state_dict(), upcycled, router_std=router_std,
                                generator=torch.Generator().manual_seed(0))
        upcycled.load_state_dict(sd)
        torch.testing.assert_close(upcycled(x, t, y), expected, rtol=1e-4, atol=1e-5)
