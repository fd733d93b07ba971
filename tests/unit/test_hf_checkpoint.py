"""Hugging Face checkpoints in and out (trainer/adapt/hf_bridge.py, models/hf/).

Tiny random models of every supported family are built from configs with transformers (nothing is
downloaded), their weights perturbed so that no norm is all ones and no bias all zeros (a swapped
or dropped tensor then shows), and saved:
    per_expert   save_pretrained's own files (transformers 5 writes routed experts one by one)
    fused        the model's in-memory state dict (experts.gate_up_proj [E, 2F, D], down_proj),
                 written by us as shards with model.safetensors.index.json
Imported, our model's logits match transformers' within 1e-4 (fp32); exported back (both expert
layouts, sharded or not) transformers loads it and its logits equal the original's exactly.
"""
from __future__ import annotations

import json
import os

import pytest
import torch

transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

import models  # noqa: E402
from trainer.config import ConfigError  # noqa: E402
from trainer.adapt.hf_bridge import hf_config, import_hf, init_model_from, write_checkpoint  # noqa: E402
from trainer.adapt.hf_export import export_hf  # noqa: E402

COMMON = dict(vocab_size=96, hidden_size=32, num_attention_heads=4, max_position_embeddings=64,
              initializer_range=0.1, tie_word_embeddings=False)
CONFIGS = {
    # Softmax top-2 with renormalisation; GQA.
    "mixtral": lambda: transformers.MixtralConfig(**COMMON, num_key_value_heads=2, intermediate_size=24,
                                                  num_hidden_layers=2, num_local_experts=4, num_experts_per_tok=2,
                                                  rope_parameters={"rope_type": "default", "rope_theta": 5000.0}),
    # q/k/v biases, top-k without renormalisation, a gated shared expert, layer 0 dense (mlp_only_layers).
    "qwen2_moe": lambda: transformers.Qwen2MoeConfig(**COMMON, num_key_value_heads=2, intermediate_size=48,
                                                     num_hidden_layers=3, moe_intermediate_size=16,
                                                     shared_expert_intermediate_size=40, num_experts=6,
                                                     num_experts_per_tok=3, norm_topk_prob=False, mlp_only_layers=[0]),
    # Renormalised variant, MoE every 2nd layer (decoder_sparse_step), tied embeddings.
    "qwen2_moe_step2": lambda: transformers.Qwen2MoeConfig(**{**COMMON, "tie_word_embeddings": True},
                                                           num_key_value_heads=4, intermediate_size=48,
                                                           num_hidden_layers=4, moe_intermediate_size=16,
                                                           shared_expert_intermediate_size=24, num_experts=4,
                                                           num_experts_per_tok=2, norm_topk_prob=True,
                                                           decoder_sparse_step=2),
    # q/k RMSNorm over the whole projections, no renormalisation, clip_qkv, attention biases.
    "olmoe": lambda: transformers.OlmoeConfig(**COMMON, num_key_value_heads=2, intermediate_size=16,
                                              num_hidden_layers=2, num_experts=6, num_experts_per_tok=2,
                                              norm_topk_prob=False, clip_qkv=0.6, attention_bias=True,
                                              pad_token_id=0, eos_token_id=1),
    # Sigmoid scores + correction bias, 4 groups keep 2, routed scale, 2 shared experts, first layer
    # dense, MLA with a q bottleneck and interleaved RoPE.
    "deepseek_v3": lambda: transformers.DeepseekV3Config(
        **COMMON, num_key_value_heads=4, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=3, n_routed_experts=8,
        n_group=4, topk_group=2, num_experts_per_tok=3, first_k_dense_replace=1, n_shared_experts=2,
        routed_scaling_factor=2.5, norm_topk_prob=True, q_lora_rank=16, kv_lora_rank=12, qk_nope_head_dim=8,
        qk_rope_head_dim=4, v_head_dim=6, rope_interleave=True, bos_token_id=0, eos_token_id=1),
    # Full-rank q, rotate-half RoPE, attention biases, no renormalisation.
    "deepseek_v3_plain": lambda: transformers.DeepseekV3Config(
        **COMMON, num_key_value_heads=4, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=2, n_routed_experts=4,
        n_group=1, topk_group=1, num_experts_per_tok=2, first_k_dense_replace=0, n_shared_experts=1,
        routed_scaling_factor=1.5, norm_topk_prob=False, q_lora_rank=None, kv_lora_rank=8, qk_nope_head_dim=4,
        qk_rope_head_dim=8, v_head_dim=4, rope_interleave=False, attention_bias=True, bos_token_id=0,
        eos_token_id=1),
    # Per-head q/k RMSNorm, head_dim 12 (x 4 heads != hidden 32), attention biases (o_proj too),
    # layer 1 dense (mlp_only_layers: MoE every 2nd layer), renormalised top-3, a sliding window of 4 on every layer.
    "qwen3_moe": lambda: transformers.Qwen3MoeConfig(
        **COMMON, num_key_value_heads=2, head_dim=12, intermediate_size=40, num_hidden_layers=3,
        moe_intermediate_size=16, num_experts=6, num_experts_per_tok=3, norm_topk_prob=True, mlp_only_layers=[1],
        decoder_sparse_step=1, attention_bias=True, use_sliding_window=True, sliding_window=4),
    # Partial rotary (RoPE on the first 6 of head_dim 10), q/k/v biases (no o_proj bias),
    # per-head q/k norm, sigmoid + correction bias in 3 groups keep 2, routed scale, 2 shared
    # experts, first layer dense, GQA 4/2.
    "glm4_moe": lambda: transformers.Glm4MoeConfig(
        **COMMON, num_key_value_heads=2, head_dim=10, intermediate_size=48, moe_intermediate_size=16,
        num_hidden_layers=3, n_routed_experts=6, n_group=3, topk_group=2, num_experts_per_tok=3,
        first_k_dense_replace=1, n_shared_experts=2, routed_scaling_factor=1.8, norm_topk_prob=True,
        attention_bias=True, use_qk_norm=True,
        rope_parameters={"rope_type": "default", "rope_theta": 8000.0, "partial_rotary_factor": 0.6}),
    # MLA with a q bottleneck (RoPE in pairs), softmax group-limited greedy (group score = max) in 4
    # groups keep 2, routed scale, 2 shared experts, first layer dense.
    "deepseek_v2": lambda: transformers.DeepseekV2Config(
        **COMMON, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=3, n_routed_experts=8,
        topk_method="group_limited_greedy", n_group=4, topk_group=2, num_experts_per_tok=3, first_k_dense_replace=1,
        n_shared_experts=2, routed_scaling_factor=2.0, q_lora_rank=16, kv_lora_rank=12, qk_nope_head_dim=8,
        qk_rope_head_dim=4, v_head_dim=6, bos_token_id=0, eos_token_id=1),
    # Full-rank q, greedy top-2, attention biases, every layer MoE.
    "deepseek_v2_plain": lambda: transformers.DeepseekV2Config(
        **COMMON, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=2, n_routed_experts=4,
        topk_method="greedy", num_experts_per_tok=2, first_k_dense_replace=0, n_shared_experts=1,
        routed_scaling_factor=1.0, q_lora_rank=None, kv_lora_rank=8, qk_nope_head_dim=4, qk_rope_head_dim=8,
        v_head_dim=4, attention_bias=True, bos_token_id=0, eos_token_id=1),
    # Per-head q/k norm, attention biases, sigmoid + correction bias in 2 groups keep 1, no
    # renormalisation, 1 shared expert, first layer dense, a window of 5 on layers 1 and 2.
    "dots1": lambda: transformers.Dots1Config(
        **COMMON, num_key_value_heads=2, head_dim=12, intermediate_size=40, moe_intermediate_size=16,
        num_hidden_layers=3, n_routed_experts=6, n_group=2, topk_group=1, num_experts_per_tok=2,
        first_k_dense_replace=1, n_shared_experts=1, routed_scaling_factor=1.5, norm_topk_prob=False,
        attention_bias=True, sliding_window=5, max_window_layers=1),
    # YaRN RoPE (cos/sin times the attention factor, untruncated band) on a Mixtral.
    "mixtral_yarn": lambda: transformers.MixtralConfig(
        **COMMON, num_key_value_heads=2, head_dim=8, intermediate_size=24, num_hidden_layers=2, num_local_experts=4,
        num_experts_per_tok=2, rope_parameters={"rope_type": "yarn", "rope_theta": 5000.0, "factor": 4.0,
                                                "original_max_position_embeddings": 16, "beta_fast": 8.0,
                                                "beta_slow": 0.5, "truncate": False}),
    # DeepSeek-V3 with YaRN and mscale != mscale_all_dim: the RoPE tables' attention factor and MLA's
    # softmax scale times mscale(mscale_all_dim)².
    "deepseek_v3_yarn": lambda: transformers.DeepseekV3Config(
        **COMMON, num_key_value_heads=4, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=2,
        n_routed_experts=4, n_group=2, topk_group=1, num_experts_per_tok=2, first_k_dense_replace=1,
        n_shared_experts=1, routed_scaling_factor=2.0, norm_topk_prob=True, q_lora_rank=16, kv_lora_rank=12,
        qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=6, rope_interleave=True, bos_token_id=0, eos_token_id=1,
        rope_parameters={"rope_type": "yarn", "rope_theta": 1e4, "factor": 8.0, "original_max_position_embeddings": 8,
                         "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 0.8}),
    # Attention sinks, a 4-token window on layers 0 and 2 (layer_types), q/k/v/o biases, head_dim 12
    # (x 4 heads != hidden 32), YaRN; router bias, softmax over the top-2 logits; expert biases and
    # the clamped SwiGLU with a limit the perturbed activations reach; 6 experts of width 20 (even: ep=2).
    "gpt_oss": lambda: transformers.GptOssConfig(
        **COMMON, num_key_value_heads=2, head_dim=12, intermediate_size=20, num_hidden_layers=3, num_local_experts=6,
        num_experts_per_tok=2, sliding_window=4, swiglu_limit=0.8, rope_parameters={
            "rope_type": "yarn", "rope_theta": 150000.0, "factor": 4.0, "original_max_position_embeddings": 16,
            "beta_fast": 32.0, "beta_slow": 1.0, "truncate": False}),
}
TOKENS = torch.randint(0, 96, (2, 11), generator=torch.Generator().manual_seed(0))


@torch.no_grad()
def hf_model(name: str, seed: int = 0):
    """A random transformers model of CONFIGS[name] in eval mode, every tensor perturbed."""
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(CONFIGS[name](), attn_implementation="eager").eval()
    gen = torch.Generator().manual_seed(seed + 1)
    for pname, t in list(model.named_parameters()) + list(model.named_buffers()):
        noise = torch.randn(t.shape, generator=gen)
        if pname.endswith("inv_freq"):
            continue
        if "norm" in pname:
            t.copy_(1.0 + 0.2 * noise)
        elif pname.endswith(("bias", "e_score_correction_bias")):
            t.copy_(0.1 * noise)
        else:
            t.copy_(0.15 * noise)
    return model


def save(model, path, layout: str) -> str:
    """save_pretrained (per-expert files), or the in-memory fused state dict in 3 shards + index."""
    model.save_pretrained(path)
    if layout == "fused":
        for f in os.listdir(path):
            if f.endswith(".safetensors") or f.endswith(".index.json"):
                os.remove(os.path.join(path, f))
        state = {k: v.contiguous() for k, v in model.state_dict().items()}
        names = sorted(state)
        shards = [names[i::3] for i in range(3)]
        weight_map = {}
        for i, shard in enumerate(shards):
            file = f"model-{i + 1:05d}-of-00003.safetensors"
            safetensors_torch.save_file({n: state[n] for n in shard}, os.path.join(path, file), metadata={"format": "pt"})
            weight_map.update({n: file for n in shard})
        with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {}, "weight_map": weight_map}, f)
    return str(path)


def ours_from(hf_dir: str):
    cfg = hf_config(hf_dir)
    model = models.build_model(cfg.model, cfg.moe).eval()
    init_model_from(model, "hf:" + hf_dir)
    return model


@torch.no_grad()
def max_diff(a, b) -> float:
    return (a.float() - b.float()).abs().max().item()


# What each family turns into: (section, key) -> value, checked on import.
EXPECTED = {
    "mixtral": {("moe", "renormalize"): True, ("model", "rope_theta"): 5000.0, ("model", "num_kv_heads"): 2},
    "qwen2_moe": {("moe", "first_k_dense"): 1, ("moe", "moe_every"): 1, ("moe", "renormalize"): False,
                  ("model", "qkv_bias"): True, ("moe", "num_shared_experts"): 1, ("moe", "shared_expert_ffn_dim"): 40,
                  ("moe", "shared_expert_gate"): True},
    "qwen2_moe_step2": {("moe", "first_k_dense"): 1, ("moe", "moe_every"): 2, ("moe", "renormalize"): True,
                        ("model", "tie_embeddings"): True},
    "olmoe": {("model", "qk_norm"): True, ("model", "clip_qkv"): 0.6, ("moe", "renormalize"): False,
              ("model", "qkv_bias"): True, ("model", "attn_out_bias"): True},
    "deepseek_v3": {("model", "attention"): "mla", ("model", "mla_q_lora_rank"): 16, ("moe", "score_func"): "sigmoid",
                    ("moe", "num_groups"): 4, ("moe", "topk_group"): 2, ("moe", "routed_scaling_factor"): 2.5,
                    ("moe", "first_k_dense"): 1, ("moe", "num_shared_experts"): 2, ("moe", "aux_free"): True},
    "deepseek_v3_plain": {("model", "mla_q_lora_rank"): 0, ("moe", "renormalize"): False, ("model", "qkv_bias"): True},
    "qwen3_moe": {("model", "qk_norm_per_head"): True, ("model", "head_dim"): 12, ("model", "attn_out_bias"): True,
                  ("model", "sliding_window"): 4, ("model", "sliding_window_layers"): [], ("moe", "first_k_dense"): 0,
                  ("moe", "moe_every"): 2, ("moe", "num_shared_experts"): 0, ("moe", "renormalize"): True},
    "glm4_moe": {("model", "partial_rotary_factor"): 0.6, ("model", "qk_norm_per_head"): True,
                 ("model", "qkv_bias"): True, ("model", "attn_out_bias"): False, ("model", "rope_theta"): 8000.0,
                 ("moe", "score_func"): "sigmoid", ("moe", "aux_free"): True, ("moe", "num_groups"): 3,
                 ("moe", "topk_group"): 2, ("moe", "routed_scaling_factor"): 1.8, ("moe", "first_k_dense"): 1,
                 ("moe", "num_shared_experts"): 2},
    "deepseek_v2": {("model", "attention"): "mla", ("moe", "score_func"): "softmax", ("moe", "num_groups"): 4,
                    ("moe", "group_score"): "max", ("moe", "renormalize"): False, ("moe", "aux_free"): False,
                    ("moe", "routed_scaling_factor"): 2.0, ("moe", "first_k_dense"): 1},
    "deepseek_v2_plain": {("model", "mla_q_lora_rank"): 0, ("moe", "num_groups"): 0, ("model", "qkv_bias"): True},
    "dots1": {("model", "qk_norm_per_head"): True, ("model", "sliding_window"): 5,
              ("model", "sliding_window_layers"): [1, 2], ("moe", "score_func"): "sigmoid", ("moe", "aux_free"): True,
              ("moe", "num_groups"): 2, ("moe", "renormalize"): False, ("model", "attn_out_bias"): True},
    "mixtral_yarn": {("model", "rope_scaling"): "yarn", ("model", "rope_factor"): 4.0,
                     ("model", "rope_original_max_seq_len"): 16, ("model", "rope_beta_fast"): 8.0,
                     ("model", "rope_beta_slow"): 0.5, ("model", "rope_truncate"): False},
    "deepseek_v3_yarn": {("model", "rope_scaling"): "yarn", ("model", "rope_factor"): 8.0, ("model", "rope_mscale"): 1.0,
                         ("model", "rope_mscale_all_dim"): 0.8, ("model", "rope_original_max_seq_len"): 8},
    "gpt_oss": {("model", "attn_sinks"): True, ("model", "sliding_window"): 4, ("model", "sliding_window_layers"): [0, 2],
                ("model", "qkv_bias"): True, ("model", "attn_out_bias"): True, ("model", "head_dim"): 12,
                ("model", "rope_scaling"): "yarn", ("moe", "router_bias"): True, ("moe", "expert_bias"): True,
                ("moe", "expert_act"): "clamped_swiglu", ("moe", "swiglu_limit"): 0.8, ("moe", "renormalize"): True},
}


@pytest.mark.parametrize("layout", ["per_expert", "fused"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_imported_logits_match_transformers(tmp_path, name, layout):
    hf = hf_model(name)
    hf_dir = save(hf, tmp_path / "hf", layout)
    names = os.listdir(hf_dir)
    assert ("model.safetensors.index.json" in names) == (layout == "fused")
    cfg = hf_config(hf_dir)
    assert {k: getattr(getattr(cfg, k[0]), k[1]) for k in EXPECTED[name]} == EXPECTED[name]
    ours = ours_from(hf_dir)
    with torch.no_grad():
        expected = hf(TOKENS).logits
        got = ours(TOKENS)
    assert max_diff(got, expected) <= 1e-4, max_diff(got, expected)
    assert expected.abs().max() > 1.0  # not a degenerate comparison of near-zero logits


@pytest.mark.parametrize("name", ["mixtral", "qwen2_moe", "olmoe", "deepseek_v3", "deepseek_v3_plain", "qwen3_moe",
                                  "glm4_moe", "deepseek_v2", "deepseek_v2_plain", "dots1", "mixtral_yarn",
                                  "deepseek_v3_yarn", "gpt_oss"])
def test_round_trip_hf_ours_hf(tmp_path, name):
    """HF -> our checkpoint -> HF, in both expert layouts (the fused one sharded): transformers
    loads the export with the original's weights bit for bit, and gives exactly its logits.

    Parameters are re-placed in fresh memory before the forward: tensors mapped from a file sit
    at other alignments, and CPU kernels then take other vectorised paths (rounding differences
    of ~1e-7 with identical weights). deepseek_v3_plain was saved with rotate-half RoPE and comes
    back in DeepSeek's interleaved layout (permuted rows): the same function, computed in another
    order, so its logits are compared within 1e-5.
    """
    hf = hf_model(name)
    hf_dir = save(hf, tmp_path / "hf", "per_expert")
    ckpt = import_hf(hf_dir, str(tmp_path / "ckpt"))
    assert os.path.basename(ckpt) == "step_00000000"
    with torch.no_grad():
        expected = hf(TOKENS).logits
    for layout, shard_bytes in [("per_expert", 5 * 2**30), ("fused", 40_000)]:
        out = tmp_path / f"export_{layout}"
        model_type, files = export_hf(ckpt, str(out), expert_layout=layout, max_shard_bytes=shard_bytes)
        assert model_type == hf.config.model_type
        assert ("model.safetensors.index.json" in files) == (layout == "fused")
        back = transformers.AutoModelForCausalLM.from_pretrained(str(out), attn_implementation="eager").eval()
        with torch.no_grad():
            for p in back.parameters():
                p.data = p.data.clone()
            got = back(TOKENS).logits
        if name == "deepseek_v3_plain":
            assert max_diff(got, expected) <= 1e-5
            continue
        original, loaded = hf.state_dict(), back.state_dict()
        assert sorted(original) == sorted(loaded)
        assert all(torch.equal(original[k], loaded[k]) for k in original)
        assert torch.equal(got, expected)
    if name != "deepseek_v3_plain":
        # per_expert is what save_pretrained writes: the same tensors under the same names.
        from safetensors.torch import load_file

        original, exported = load_file(os.path.join(hf_dir, "model.safetensors")), \
            load_file(os.path.join(tmp_path, "export_per_expert", "model.safetensors"))
        assert sorted(original) == sorted(exported)
        assert all(torch.equal(original[k], exported[k]) for k in original)


def test_ours_exports_and_loads_without_hf_origin(tmp_path):
    """A model of ours (not imported) exports to the family that expresses it: our tiny preset
    is a Mixtral; with a gated shared expert and q/k/v biases a Qwen2-MoE; with per-head q/k norm
    and a sliding window a Qwen3-MoE; with partial rotary, sigmoid scores and the aux-free bias a
    GLM-4.5; with sinks, a window on layer 1, YaRN, biased router and experts and the clamped
    SwiGLU a gpt-oss."""
    from trainer.recipe import load_config

    for overrides, family in [([], "mixtral"),
                              (["moe.num_shared_experts=1", "moe.shared_expert_gate=true", "model.qkv_bias=true",
                                "moe.renormalize=false", "moe.first_k_dense=1"], "qwen2_moe"),
                              (["model.qk_norm_per_head=true", "model.head_dim=12", "model.sliding_window=5",
                                "moe.moe_every=2"], "qwen3_moe"),
                              (["moe.score_func=sigmoid", "moe.aux_free=true", "moe.num_shared_experts=1",
                                "model.partial_rotary_factor=0.5", "model.qkv_bias=true", "moe.num_groups=2",
                                "moe.topk_group=1"], "glm4_moe"),
                              (["model.attn_sinks=true", "model.sliding_window=4", "model.sliding_window_layers=[1]",
                                "model.qkv_bias=true", "model.attn_out_bias=true", "moe.router_bias=true",
                                "moe.expert_bias=true", "moe.expert_act=clamped_swiglu", "moe.swiglu_limit=0.5",
                                "model.rope_scaling=yarn", "model.rope_factor=2", "model.rope_original_max_seq_len=8"],
                               "gpt_oss")]:
        cfg = load_config(None, ["model.preset=tiny", "model.d_model=32", "model.num_layers=2",
                                 "moe.expert_ffn_dim=16", "model.ffn_dim=32", "model.max_seq_len=64", "data.seq_len=32",
                                 *overrides])
        torch.manual_seed(0)
        model = models.build_model(cfg.model, cfg.moe).eval()
        for p in model.parameters():  # biases and norms away from their init
            torch.nn.init.normal_(p, std=0.1 if p.dim() > 1 else 0.3)
        ckpt = write_checkpoint(str(tmp_path / family), cfg, model.state_dict(), {})
        model_type, _ = export_hf(ckpt, str(tmp_path / f"{family}_hf"))
        assert model_type == family
        back = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / f"{family}_hf")).eval()
        tokens = TOKENS % cfg.model.vocab_size
        with torch.no_grad():
            assert max_diff(back(tokens).logits, model(tokens)) <= 1e-4


def zeros_state(cfg) -> dict:
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in models.build_model(cfg.model, cfg.moe).state_dict().items()}
    return {k: torch.zeros(shape) for k, shape in shapes.items()}


def test_one_line_errors(tmp_path):
    # not a Hugging Face directory; another family; our own checkpoint given as hf:
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="is not a Hugging Face model directory: no config.json"):
        hf_config(str(tmp_path / "empty"))
    llama = tmp_path / "llama"
    transformers.LlamaForCausalLM(transformers.LlamaConfig(**COMMON, intermediate_size=16, num_hidden_layers=1)) \
        .save_pretrained(llama)
    with pytest.raises(ConfigError, match=r"config.json: model_type 'llama' is not supported; supported: mixtral"):
        hf_config(str(llama))
    # a DiT checkpoint of ours does not export; a model no family expresses names what is missing
    from trainer.recipe import load_config

    dit = load_config(None, ["model.preset=dit_tiny_moe"])
    state = zeros_state(dit)
    dit_ckpt = write_checkpoint(str(tmp_path / "dit"), dit, state, {})
    with pytest.raises(ConfigError, match="holds a dit model"):
        export_hf(dit_ckpt, str(tmp_path / "dit_hf"))
    with pytest.raises(ConfigError, match=r"llama is not a complete checkpoint of ours .* \(a Hugging Face directory\)"):
        export_hf(str(llama), str(tmp_path / "x"))
    cfg = load_config(None, ["model.preset=tiny", "moe.aux_free=true"])
    state = zeros_state(cfg)
    ckpt = write_checkpoint(str(tmp_path / "aux_free"), cfg, state, {})
    with pytest.raises(ConfigError, match="no Hugging Face family fits this model: mixtral cannot express: the aux-free"):
        export_hf(ckpt, str(tmp_path / "aux_free_hf"))
    with pytest.raises(ConfigError, match="deepseek_v3 cannot express: model.attention=gqa"):
        export_hf(ckpt, str(tmp_path / "aux_free_hf"), model_type="deepseek_v3")


def test_import_refuses_wrong_shapes(tmp_path):
    """A config.json that does not describe its weights is named, tensor and shapes."""
    hf_dir = save(hf_model("mixtral"), tmp_path / "hf", "per_expert")
    with open(os.path.join(hf_dir, "config.json")) as f:
        cfg = json.load(f)
    cfg["intermediate_size"] = 20
    with open(os.path.join(hf_dir, "config.json"), "w") as f:
        json.dump(cfg, f)
    cfg = hf_config(hf_dir)
    model = models.build_model(cfg.model, cfg.moe)
    with pytest.raises(ConfigError, match=r"block_sparse_moe.experts.[*].w1.weight stacked over experts have "
                                          r"shape \(4, 24, 32\), our layers.0.ffn.experts.w1_EFD needs \(4, 20, 32\)"):
        init_model_from(model, "hf:" + hf_dir)


def test_init_from_a_checkpoint_of_ours(tmp_path):
    """model.init_from with a checkpoint directory of ours (LLM and DiT): the architecture keys
    come from its config.yaml over the recipe's, and the weights load whole."""
    from trainer.recipe import load_config

    for preset, arch in [("tiny", ["model.d_model=48", "model.num_layers=3", "moe.num_experts=6", "moe.top_k=3",
                                   "model.qkv_bias=true", "moe.aux_free=true"]),
                         ("dit_tiny_moe", ["model.d_model=64", "moe.num_experts=4", "model.image_size=16"])]:
        source_cfg = load_config(None, [f"model.preset={preset}", *arch])
        torch.manual_seed(0)
        source = models.build_model(source_cfg.model, source_cfg.moe)
        ckpt = write_checkpoint(str(tmp_path / preset), source_cfg, source.state_dict(), {})
        cfg = load_config(None, [f"model.preset={preset}", f"model.init_from={tmp_path / preset}"])  # its folder
        for item in arch:
            section, rest = item.split(".", 1)
            key, value = rest.split("=")
            assert str(getattr(getattr(cfg, section), key)).lower() == value, item
        model = models.build_model(cfg.model, cfg.moe)
        assert init_model_from(model, cfg.model.init_from).endswith(f"({len(source.state_dict())} tensors)")
        assert os.path.basename(ckpt) == "step_00000000"
        for (name, a), b in zip(source.state_dict().items(), model.state_dict().values()):
            assert torch.equal(a, b), name


def test_bf16_model_stays_bf16(tmp_path):
    """A bf16 model imports as a bf16 checkpoint (no fp32 copy on the way), which model.init_from
    loads into our fp32 model as the exact upcast values, and which exports back (--dtype auto)
    bit for bit in bf16; --dtype fp32 upcasts."""
    from safetensors.torch import load_file
    from torch.distributed.checkpoint import FileSystemReader

    hf_dir = save(hf_model("qwen2_moe").to(torch.bfloat16), tmp_path / "hf", "per_expert")
    ckpt = import_hf(hf_dir, str(tmp_path / "ckpt"))
    stored = FileSystemReader(ckpt).read_metadata().state_dict_metadata
    assert {m.properties.dtype for m in stored.values() if hasattr(m, "properties")} == {torch.bfloat16}
    cfg = hf_config(hf_dir)
    model = models.build_model(cfg.model, cfg.moe)
    init_model_from(model, ckpt)
    for (name, a), b in zip(ours_from(hf_dir).state_dict().items(), model.state_dict().values()):
        assert b.dtype == torch.float32 and torch.equal(a, b), name
    source = load_file(os.path.join(hf_dir, "model.safetensors"))
    for dtype in ("auto", "fp32"):
        export_hf(ckpt, str(tmp_path / dtype), dtype=dtype)
        with open(tmp_path / dtype / "config.json") as f:
            assert json.load(f)["torch_dtype"] == {"auto": "bfloat16", "fp32": "float32"}[dtype]
        exported = load_file(str(tmp_path / dtype / "model.safetensors"))
        assert sorted(exported) == sorted(source)
        for name, t in source.items():
            want = t if dtype == "auto" else t.float()
            assert exported[name].dtype == want.dtype and torch.equal(exported[name], want), name


def test_max_shard_size_parsing():
    from launch.hf import parse_size

    assert [parse_size(t) for t in ("5GB", "500MB", "20KB", "20000", "1.5G")] == \
        [5 * 2**30, 500 * 2**20, 20 * 2**10, 20000, int(1.5 * 2**30)]
    with pytest.raises(ConfigError, match="--max-shard-size: expected a size like 5GB"):
        parse_size("5XB")
