"""RoPE tables (models/rope.py) equal transformers' for every `model.rope_scaling`: cos and sin
of the same positions, attention factor included, and dynamic NTK past the original context."""
import pytest
import torch

transformers = pytest.importorskip("transformers")

from models.rope import RopeScaling, mla_softmax_scale, rope_tables  # noqa: E402

HEAD_DIM, MAX_POS = 16, 64
CASES = {
    "none": ({"rope_type": "default"}, RopeScaling()),
    "linear": ({"rope_type": "linear", "factor": 2.5}, RopeScaling("linear", 2.5, MAX_POS)),
    "dynamic": ({"rope_type": "dynamic", "factor": 3.0}, RopeScaling("dynamic", 3.0, MAX_POS)),
    "yarn": ({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16, "beta_fast": 8.0,
              "beta_slow": 0.5}, RopeScaling("yarn", 4.0, 16, 8.0, 0.5)),
    "yarn_untruncated": ({"rope_type": "yarn", "factor": 32.0, "original_max_position_embeddings": 8,
                          "truncate": False}, RopeScaling("yarn", 32.0, 8, truncate=False)),
    "yarn_mscale": ({"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 16, "mscale": 1.0,
                     "mscale_all_dim": 0.8}, RopeScaling("yarn", 8.0, 16, mscale=1.0, mscale_all_dim=0.8)),
    "yarn_attention_factor": ({"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 32,
                               "attention_factor": 1.3}, RopeScaling("yarn", 2.0, 32, attention_factor=1.3)),
}


def hf_tables(params: dict, num_positions: int):
    cfg = transformers.MixtralConfig(hidden_size=HEAD_DIM * 4, num_attention_heads=4, head_dim=HEAD_DIM, max_position_embeddings=MAX_POS,
                                     rope_parameters={"rope_theta": 5000.0, **params})
    rotary = transformers.models.mixtral.modeling_mixtral.MixtralRotaryEmbedding(cfg)
    x = torch.zeros(1, num_positions, HEAD_DIM)
    cos, sin = rotary(x, torch.arange(num_positions)[None])
    return cos[0, :, : HEAD_DIM // 2], sin[0, :, : HEAD_DIM // 2]


@pytest.mark.parametrize("name", list(CASES))
def test_rope_tables_match_transformers(name):
    params, scaling = CASES[name]
    lengths = [MAX_POS, 2 * MAX_POS] if name == "dynamic" else [MAX_POS]  # dynamic: past the original context
    for n in lengths:
        cos, sin = rope_tables(HEAD_DIM, n, 5000.0, scaling)
        hf_cos, hf_sin = hf_tables(params, n)
        assert torch.allclose(cos, hf_cos, atol=1e-6, rtol=0), (name, n, (cos - hf_cos).abs().max())
        assert torch.allclose(sin, hf_sin, atol=1e-6, rtol=0), (name, n)


def test_plain_tables_unchanged_and_mla_scale():
    inv_freq = 1.0 / 5000.0 ** (torch.arange(0, HEAD_DIM, 2, dtype=torch.float32) / HEAD_DIM)
    angles = torch.outer(torch.arange(MAX_POS, dtype=torch.float32), inv_freq)
    cos, sin = rope_tables(HEAD_DIM, MAX_POS, 5000.0)
    assert torch.equal(cos, angles.cos()) and torch.equal(sin, angles.sin())
    from transformers.modeling_rope_utils import yarn_apply_mscale

    params = {"rope_type": "yarn", "factor": 40.0, "mscale_all_dim": 0.707}
    assert mla_softmax_scale(24, RopeScaling("yarn", 40.0, 16, mscale_all_dim=0.707)) == \
        pytest.approx(yarn_apply_mscale(params, 24 ** -0.5), rel=1e-12)
    assert mla_softmax_scale(24, RopeScaling()) == 24 ** -0.5
