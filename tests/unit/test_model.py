"""MoETransformer, presets, parameter counts."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from models import build_model, param_counts
from models.attention import Attention, apply_rope, rope_tables
from models.config import is_moe_layer
from models.moe import MoE, expert_parameters, is_expert_param, moe_layers
from models.registry import PRESETS, preset_overrides
from models.config import MoEConfig, ModelConfig
from models.init import initialize
from trainer.recipe import load_config


def configs(name="tiny", **model_kw):
    p = preset_overrides(name)
    return ModelConfig(**{**p["model"], **model_kw}), MoEConfig(**p["moe"])


def tiny_model(**kw):
    torch.manual_seed(0)
    return build_model(*configs("tiny", **kw))


def test_forward_shapes_dtype_and_layout():
    model = tiny_model()
    logits = model(torch.randint(0, 260, (2, 16)))
    assert logits.shape == (2, 16, 260) and logits.dtype == torch.float32
    assert torch.isfinite(logits).all()
    assert len(moe_layers(model)) == 4
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert model(torch.randint(0, 260, (1, 8))).dtype == torch.float32


def test_causality():
    model = tiny_model().eval()
    tokens = torch.randint(0, 260, (2, 12))
    t = 6
    changed = tokens.clone()
    changed[:, t + 1:] = torch.randint(0, 260, (2, 12 - t - 1))
    with torch.no_grad():
        a, b = model(tokens), model(changed)
    torch.testing.assert_close(a[:, :t + 1], b[:, :t + 1])
    assert not torch.allclose(a[:, t + 1:], b[:, t + 1:])


def test_gqa_matches_repeated_kv_reference():
    torch.manual_seed(0)
    B, S, D, H, Hkv, hd = 2, 7, 32, 4, 2, 8
    attn = Attention(D, H, Hkv, hd)
    x = torch.randn(B, S, D)
    cos, sin = rope_tables(hd, S, 10000.0)
    q = apply_rope(attn.wq(x).view(B, S, H, hd), cos, sin).transpose(1, 2)
    k = apply_rope(attn.wk(x).view(B, S, Hkv, hd), cos, sin).transpose(1, 2)
    v = attn.wv(x).view(B, S, Hkv, hd).transpose(1, 2)
    k, v = k.repeat_interleave(H // Hkv, dim=1), v.repeat_interleave(H // Hkv, dim=1)
    scores = q @ k.transpose(-1, -2) / hd ** 0.5
    scores = scores.masked_fill(torch.ones(S, S, dtype=torch.bool).triu(1), float("-inf"))
    ref = attn.wo((scores.softmax(-1) @ v).transpose(1, 2).reshape(B, S, H * hd))
    torch.testing.assert_close(attn(x, cos, sin), ref)


def test_rope_is_relative():
    # <rope(q, m), rope(k, n)> depends only on m - n.
    cos, sin = rope_tables(8, 20, 10000.0)
    q, k = torch.randn(1, 1, 1, 8), torch.randn(1, 1, 1, 8)

    def dot(m, n):
        return (apply_rope(q, cos[m:m + 1], sin[m:m + 1]) * apply_rope(k, cos[n:n + 1], sin[n:n + 1])).sum()

    torch.testing.assert_close(dot(5, 2), dot(15, 12))


def test_tied_embeddings_share_storage():
    model = tiny_model(tie_embeddings=True)
    assert model.output is None
    assert model.output_weight.data_ptr() == model.tok_embeddings.weight.data_ptr()
    total, _ = param_counts(model, configs()[1])
    untied_total, _ = param_counts(tiny_model(), configs()[1])
    assert untied_total - total == 260 * 128
    model(torch.randint(0, 260, (1, 4))).sum().backward()
    assert model.tok_embeddings.weight.grad is not None


def test_meta_build_then_materialise():
    model_cfg, moe_cfg = configs(tie_embeddings=True)
    with torch.device("meta"):
        model = build_model(model_cfg, moe_cfg)
    assert all(p.is_meta for p in model.parameters())
    model.to_empty(device="cpu")
    initialize(model, seed=0)
    logits = model(torch.randint(0, 260, (1, 8)))
    assert torch.isfinite(logits).all()
    std = model.layers["0"].ffn.experts.w1_EFD.std().item()
    assert std == pytest.approx(model_cfg.init_std, rel=0.05)
    torch.testing.assert_close(model.rope.cos, rope_tables(32, 512, 10000.0)[0])
    # The same seed gives bitwise the same weights as a model built on the CPU directly.
    reference = build_model(model_cfg, moe_cfg, seed=0)
    for (name, a), b in zip(model.state_dict().items(), reference.state_dict().values()):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("name, total, active, rel", [
    ("mixtral_8x7b", 46.7e9, 12.9e9, 0.01),
    ("qwen2_moe_a2_7b", 14.3e9, 2.7e9, 0.01),
    # the GPU suite's LLM: ~2B total (weights, gradients and AdamW fit one GPU), 1/8 of experts active
    ("olmoe_2b_16e", 2.086e9, 0.676e9, 0.005),
])
def test_preset_param_counts_on_meta(name, total, active, rel):
    model_cfg, moe_cfg = configs(name)
    with torch.device("meta"):
        model = build_model(model_cfg, moe_cfg)
    assert param_counts(model, moe_cfg) == (pytest.approx(total, rel=rel), pytest.approx(active, rel=rel))


def test_tiny_dense_matches_tiny_active_ffn():
    dense_model, dense_moe = configs("tiny_dense")
    _, tiny_moe = configs("tiny")
    model = build_model(dense_model, dense_moe)
    assert not moe_layers(model)
    assert dense_model.ffn_dim == tiny_moe.top_k * tiny_moe.expert_ffn_dim


def test_moe_layer_placement():
    moe_cfg = MoEConfig(num_experts=4, first_k_dense=1, moe_every=2)
    assert [is_moe_layer(i, moe_cfg) for i in range(6)] == [False, True, False, True, False, True]
    model = build_model(ModelConfig(num_layers=6), moe_cfg)
    assert [isinstance(b.ffn, MoE) for b in model.layers.values()] == [False, True, False, True, False, True]


def test_expert_params_are_marked():
    model = tiny_model()
    names = [n for n, _ in expert_parameters(model)]
    assert len(names) == 3 * 4 and all(".ffn.experts.w" in n for n in names)
    assert not is_expert_param("layers.0.ffn.shared_experts.w1.weight")
    assert not is_expert_param("layers.0.ffn.router.gate.weight")


def test_presets_are_valid_configs():
    for name in PRESETS:
        cfg = load_config(None, [f"model.preset={name}"])
        assert cfg.model.preset == name
    with pytest.raises(KeyError, match="unknown preset 'nope'; known: .*tiny"):
        preset_overrides("nope")


def test_models_never_import_torch_distributed():
    import pathlib
    import re

    root = pathlib.Path(__file__).resolve().parents[2] / "models"
    pattern = re.compile(r"^\s*(import|from)\s+torch\.distributed|^\s*from\s+torch\s+import\s+.*distributed", re.M)
    for path in root.rglob("*.py"):
        assert not pattern.search(path.read_text()), path


def test_train_step_reduces_loss():
    model = tiny_model()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    tokens = torch.randint(0, 260, (4, 33))
    losses = []
    for _ in range(8):
        logits = model(tokens[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
