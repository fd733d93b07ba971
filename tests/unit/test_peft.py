"""models/peft: LoRA (linear and expert), PERFT S/D/R/E, ESFT, merging, counting, freezing."""
from __future__ import annotations

import copy
import re
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from models import build_model
from models.moe import GroupedExperts, MoE, RouterOutput, Routing, moe_layers, pop_router_stats
from models.peft import (ExpertLoRA, LoRALinear, PerftAdapters, adapter_parameter_names, apply_esft,
                         apply_lora, apply_peft, apply_perft, count_parameters, expert_scores,
                         merge_adapters, partially_frozen_parameters, select_experts,
                         zero_frozen_expert_grads)
from parallel.expert_parallel import shard_experts
from parallel.pipeline import layer_costs
from models.config import MoEConfig, ModelConfig

LLM = dict(family="llm", vocab_size=64, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, ffn_dim=48,
           max_seq_len=16, init_std=0.2)
LLM_MOE = dict(num_experts=4, top_k=2, expert_ffn_dim=16, num_shared_experts=1, shared_expert_ffn_dim=16,
               backend="loop")
DIT = dict(family="dit", d_model=32, num_layers=2, num_heads=4, num_kv_heads=4, ffn_dim=64, norm_eps=1e-6,
           image_size=8, patch_size=2, in_channels=1, num_classes=10, class_dropout_prob=0.1)
DIT_MOE = dict(num_experts=4, top_k=2, expert_ffn_dim=32, renormalize=False, backend="loop")


def peft_cfg(**kw):
    """The fields of trainer.config.PeftConfig that apply_peft reads, with its defaults."""
    base = dict(method="none", train_router=False, lora_rank=4, lora_alpha=8.0, lora_dropout=0.0,
                lora_targets=[], perft_variant="R", perft_num_adapters=4, perft_top_k=2, perft_rank=4,
                esft_score="gate_mass", esft_top_p=0.2)
    return SimpleNamespace(**{**base, **kw})


def tiny_llm(seed=0, **moe_kw):
    torch.manual_seed(seed)
    return build_model(ModelConfig(**LLM), MoEConfig(**{**LLM_MOE, **moe_kw})).eval()


def tiny_dit(seed=0):
    torch.manual_seed(seed)
    model = build_model(ModelConfig(**DIT), MoEConfig(**DIT_MOE)).eval()
    perturb(model.parameters())  # leave adaLN-Zero's identity regime: every block contributes
    return model


def tokens(B=2, S=12, seed=1):
    return torch.randint(0, 64, (B, S), generator=torch.Generator().manual_seed(seed))


def dit_inputs(B=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, 1, 8, 8, generator=g), torch.randint(0, 1000, (B,), generator=g).float(),
            torch.randint(0, 10, (B,), generator=g))


@torch.no_grad()
def perturb(params, std=0.1, seed=2):
    g = torch.Generator().manual_seed(seed)
    for p in params:
        p.add_(torch.randn(p.shape, generator=g) * std)


def named(model, part):
    return [p for n, p in model.named_parameters() if part in n]


# -- LoRA ----------------------------------------------------------------------------------------


def test_lora_starts_equal_to_base_and_keeps_base_names():
    base = tiny_llm()
    model = copy.deepcopy(base)
    names = apply_lora(model, ["layers.*.attn.*", "layers.*.ffn.experts"], rank=4, alpha=8.0)
    assert names == [f"layers.{i}.{m}" for i in range(2)
                     for m in ("attn.wq", "attn.wk", "attn.wv", "attn.wo", "ffn.experts")]
    assert isinstance(model.layers["0"].attn.wq, LoRALinear)
    assert isinstance(model.layers["1"].ffn.experts.lora, ExpertLoRA)
    x = tokens()
    assert torch.equal(model(x), base(x))  # B = 0: not even rounding differs
    # Base keys unchanged: a base state dict loads with only the LoRA keys missing.
    missing, unexpected = model.load_state_dict(base.state_dict(), strict=False)
    assert unexpected == [] and missing and all("lora" in k for k in missing)
    assert set(model.state_dict()) - set(missing) == set(base.state_dict())


def test_lora_merge_gives_the_adapted_logits_llm():
    model = tiny_llm()
    apply_lora(model, ["layers.*.attn.*", "layers.*.ffn.experts"], rank=4, alpha=8.0)
    perturb(p for n, p in model.named_parameters() if "lora" in n or "B_w" in n)
    x = tokens()
    adapted = model(x)
    assert not torch.allclose(adapted, tiny_llm()(x), atol=1e-3)  # the adapters do something
    assert merge_adapters(model) == 10  # 8 attention linears + 2 expert tensors sets
    assert not any("lora" in n or ".A_w" in n or ".B_w" in n for n, _ in model.named_parameters())
    assert not any(isinstance(m, (LoRALinear, ExpertLoRA)) for m in model.modules())
    assert set(model.state_dict()) == set(tiny_llm().state_dict())
    torch.testing.assert_close(model(x), adapted, atol=1e-5, rtol=1e-5)


def test_lora_merge_gives_the_adapted_output_dit():
    model = tiny_dit()
    names = apply_lora(model, ["layers.*.attn.*", "layers.*.adaLN_modulation.*"], rank=4, alpha=4.0)
    assert "layers.0.adaLN_modulation.1" in names and "layers.1.attn.qkv" in names
    assert len(names) == 6  # qkv, proj and the adaLN linear (not the SiLU) in each block
    inputs = dit_inputs()
    base_out = tiny_dit()(*inputs)
    torch.testing.assert_close(model(*inputs), base_out, atol=0, rtol=0)
    perturb(p for n, p in model.named_parameters() if "lora" in n)
    adapted = model(*inputs)
    assert (adapted - base_out).abs().max() > 1e-3
    assert merge_adapters(model) == 6
    assert not any("lora" in n for n, _ in model.named_parameters())
    torch.testing.assert_close(model(*inputs), adapted, atol=1e-5, rtol=1e-5)


def test_lora_pattern_that_matches_nothing_raises_naming_it():
    model = tiny_llm()
    with pytest.raises(ValueError, match=re.escape("'layers.*.mlp.*'")):
        apply_lora(model, ["layers.*.attn.*", "layers.*.mlp.*"], rank=4, alpha=8.0)
    # A router gate is a Linear whose weight the router reads directly: LoRA there would do nothing.
    with pytest.raises(ValueError, match="router gate"):
        apply_lora(model, ["layers.*.ffn.router.*"], rank=4, alpha=8.0)
    with pytest.raises(ValueError, match="LM head"):
        apply_lora(model, ["output"], rank=4, alpha=8.0)
    with pytest.raises(ValueError, match="empty"):
        apply_lora(model, [], rank=4, alpha=8.0)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())  # nothing half applied
    apply_lora(model, ["layers.0.attn.wq"], rank=4, alpha=8.0)
    with pytest.raises(ValueError, match="already has LoRA"):
        apply_lora(model, ["layers.0.attn.wq"], rank=4, alpha=8.0)


def test_lora_linear_forward_is_the_formula():
    torch.manual_seed(0)
    base = torch.nn.Linear(6, 5)
    lora = LoRALinear(base, rank=3, alpha=6.0)
    assert lora.weight is base.weight and lora.bias is base.bias
    perturb([lora.lora_B])
    x = torch.randn(4, 6)
    ref = x @ base.weight.t() + base.bias + 2.0 * (x @ lora.lora_A.t() @ lora.lora_B.t())
    torch.testing.assert_close(lora(x), ref)


def test_expert_lora_is_sharded_with_its_experts():
    torch.manual_seed(0)
    experts = GroupedExperts(4, 8, 12, backend="loop")
    experts.init_weights(0.5, 0.5)
    experts.lora = ExpertLoRA(experts, rank=2, alpha=4.0)
    perturb(experts.lora.parameters(), std=0.5)
    counts = torch.tensor([3, 0, 2, 4])
    x = torch.randn(9, 8)
    full = copy.deepcopy(experts)
    y = full(x, counts)
    y.square().sum().backward()
    halves = [copy.deepcopy(experts) for _ in range(2)]
    for r, half in enumerate(halves):
        shard_experts(half, r, 2)
        assert half.lora.A_w1_ERD.shape[0] == 2 and half.lora.B_w2_EDR.shape[0] == 2
    y0 = halves[0](x[:3], counts[:2])
    y1 = halves[1](x[3:], counts[2:])
    torch.testing.assert_close(torch.cat([y0, y1]), y)
    (y0.square().sum() + y1.square().sum()).backward()
    for name, p in full.lora.named_parameters():
        halves_grad = torch.cat([dict(h.lora.named_parameters())[name].grad for h in halves])
        torch.testing.assert_close(halves_grad, p.grad)


# -- PERFT ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["S", "D", "R", "E"])
def test_perft_starts_equal_to_base(variant):
    base = tiny_llm()
    model = copy.deepcopy(base)
    summary = apply_peft(model, peft_cfg(method="perft", perft_variant=variant))
    assert summary.startswith(f"peft perft: variant {variant} in 2 MoE layers")
    adapter = model.layers["0"].ffn.peft_adapter
    assert adapter.num_adapters == {"S": 1, "D": 4, "R": 4, "E": 4}[variant]
    x = tokens()
    assert torch.equal(model(x), base(x))


@pytest.mark.parametrize("train_router", [False, True])
@pytest.mark.parametrize("variant", ["S", "D", "R", "E"])
def test_perft_gradients_reach_only_adapters(variant, train_router):
    model = tiny_llm()
    apply_peft(model, peft_cfg(method="perft", perft_variant=variant, train_router=train_router))
    perturb(named(model, "w_up_NRD"))  # W_up = 0 would leave W_down and the gates without gradient
    model.train()
    model(tokens()).logsumexp(-1).mean().backward()
    expected = {n for n, _ in model.named_parameters()
                if ".peft_adapter." in n or (train_router and ".ffn.router." in n)}
    assert set(adapter_parameter_names(model)) == expected
    for name, p in model.named_parameters():
        if name in expected:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None, name


def test_perft_r_gates_are_top_k_renormalised():
    torch.manual_seed(0)
    adapter = PerftAdapters(16, "R", num_adapters=5, rank=3, top_k=2)
    perturb(adapter.router.parameters(), std=0.5)
    x = torch.randn(7, 16)
    g = adapter.gates(x, route=None)
    probs = torch.softmax(x @ adapter.router.weight.t(), -1)
    for t in range(7):
        w, idx = probs[t].topk(2)
        ref = torch.zeros(5)
        ref[idx] = w / w.sum()
        torch.testing.assert_close(g[t], ref)
    assert ((g > 0).sum(-1) == 2).all()


def make_moe(**kw):
    torch.manual_seed(0)
    layer = MoE(16, MoEConfig(**{**dict(num_experts=4, top_k=2, expert_ffn_dim=8, backend="loop"), **kw}))
    layer.init_weights(std=0.5, out_std=0.5)  # routing far from ties
    return layer.eval()


def adapter_ref(a: PerftAdapters, x_D: torch.Tensor, i: int) -> torch.Tensor:
    """A_i(x) = W_up,i silu(W_down,i x) for one token."""
    return F.silu(a.w_down_NRD[i] @ x_D) @ a.w_up_NRD[i]


def test_perft_e_uses_the_pretrained_routers_assignments():
    layer = make_moe(renormalize=True)
    x = torch.randn(11, 16)
    base_y = layer(x)
    apply_perft(layer, "E", num_adapters=0, top_k=0, rank=3)
    a = layer.peft_adapter
    perturb([a.w_up_NRD], std=0.5)
    probs = torch.softmax(x @ layer.router.gate.weight.t(), -1)
    ref = base_y.clone()
    for t in range(11):
        w, idx = probs[t].topk(2)
        w = w / w.sum()
        for j in range(2):
            ref[t] += w[j] * adapter_ref(a, x[t], idx[j])
    torch.testing.assert_close(layer(x), ref)


def test_perft_e_skips_assignments_dropped_by_capacity():
    layer = make_moe(capacity_factor=0.5)
    apply_perft(layer, "E", num_adapters=0, top_k=0, rank=3)
    x = torch.randn(16, 16)
    route = layer.router(x)
    g = layer.peft_adapter.gates(x, route)
    r = route.routing
    assert r.token_idx_N.numel() < 16 * 2  # some assignments dropped
    ref = torch.zeros(16, 4)
    for t, e, w in zip(r.token_idx_N.tolist(), r.expert_idx_N.tolist(), r.weight_N.tolist()):
        ref[t, e] = w
    torch.testing.assert_close(g, ref)


def test_perft_needs_moe_and_cannot_be_merged():
    dense = build_model(ModelConfig(**LLM), MoEConfig(num_experts=0))
    with pytest.raises(ValueError, match="no MoE layers"):
        apply_perft(dense, "R", 4, 2, 4)
    model = tiny_llm()
    apply_peft(model, peft_cfg(method="perft", perft_variant="S"))
    with pytest.raises(ValueError, match="PERFT adapters cannot be merged"):
        merge_adapters(model)


# -- ESFT ----------------------------------------------------------------------------------------


def test_select_experts_smallest_set_reaching_top_p():
    scores = torch.tensor([[0.05, 0.5, 0.3, 0.15],
                           [1.0, 2.0, 3.0, 4.0],  # unnormalised: shares .1 .2 .3 .4
                           [0.0, 0.0, 1.0, 3.0],
                           [0.0, 0.0, 0.0, 0.0]], dtype=torch.float64)
    assert select_experts(scores, 0.5) == [[1], [2, 3], [3], []]
    assert select_experts(scores, 0.6) == [[1, 2], [2, 3], [3], []]
    assert select_experts(scores, 0.7) == [[1, 2], [2, 3], [3], []]  # .4 + .3 reaches .7 exactly
    assert select_experts(scores, 0.81) == [[1, 2, 3], [1, 2, 3], [2, 3], []]
    assert select_experts(scores, 1.0) == [[0, 1, 2, 3], [0, 1, 2, 3], [2, 3], []]
    with pytest.raises(ValueError, match="top_p"):
        select_experts(scores, 0.0)


@pytest.mark.parametrize("score", ["gate_mass", "token_share"])
def test_expert_scores_match_the_router_outputs(score):
    model = tiny_llm().train()
    batches = [tokens(seed=s) for s in range(3)]
    seen = []  # (layer, RouterOutput) in call order, recorded beside expert_scores' own hooks
    hooks = [layer.router.register_forward_hook(lambda m, i, out, l=l: seen.append((l, out)))
             for l, layer in enumerate(moe_layers(model))]
    scores = expert_scores(model, lambda i: model(batches[i]), num_batches=3, score=score)
    for h in hooks:
        h.remove()
    assert scores.dtype == torch.float64 and scores.shape == (2, 4)
    assert len(seen) == 2 * 3
    ref = torch.zeros(2, 4, dtype=torch.float64)
    for l, out in seen:
        for idx_K, w_K in zip(out.topk_idx_TK.tolist(), out.topk_weight_TK.tolist()):
            for e, w in zip(idx_K, w_K):
                ref[l, e] += w if score == "gate_mass" else 1.0 / 2
    torch.testing.assert_close(scores, ref)
    if score == "token_share":
        assert scores.sum().item() == pytest.approx(3 * 2 * 12 * 2)  # tokens × layers
    assert model.training and all(m.training for m in model.modules())  # modes restored
    assert pop_router_stats(model) == {}  # calibration records no balancing statistics


def esft_model(selection=((1,), (0, 3)), train_router=False):
    model = tiny_llm()
    apply_peft(model, peft_cfg(method="esft", train_router=train_router), expert_selection=[list(s) for s in selection])
    return model.train()


@pytest.mark.parametrize("train_router", [False, True])
def test_esft_trains_only_the_selected_expert_rows(train_router):
    model = esft_model(train_router=train_router)
    expected = {f"layers.{i}.ffn.experts.{w}" for i in range(2) for w in ("w1_EFD", "w3_EFD", "w2_EDF")}
    if train_router:
        expected |= {f"layers.{i}.ffn.router.gate.weight" for i in range(2)}
    assert set(adapter_parameter_names(model)) == expected
    assert len(partially_frozen_parameters(model)) == 6
    # Counted: the selected experts' rows only (1 of 4 in layer 0, 2 of 4 in layer 1), routers whole.
    per_expert = sum(model.layers["0"].ffn.experts.w1_EFD[0].numel() for _ in range(3))
    routers = sum(model.layers[str(i)].ffn.router.gate.weight.numel() for i in range(2)) if train_router else 0
    assert count_parameters(model)[0] == 3 * per_expert + routers
    model(tokens(B=4, S=16)).logsumexp(-1).mean().backward()
    zero_frozen_expert_grads(model)
    for i, chosen in enumerate([[1], [0, 3]]):
        experts = model.layers[str(i)].ffn.experts
        for p in (experts.w1_EFD, experts.w3_EFD, experts.w2_EDF):
            for e in range(4):
                assert (p.grad[e].abs().sum() > 0) == (e in chosen), (i, e)


def test_zero_frozen_expert_grads_on_an_expert_shard():
    layers = [make_moe() for _ in range(2)]
    for rank, layer in enumerate(layers):
        apply_esft(layer, [[1, 2]])
        shard_experts(layer.experts, rank, 2)  # rank 0 holds experts 0, 1; rank 1 holds 2, 3
        for p in (layer.experts.w1_EFD, layer.experts.w3_EFD, layer.experts.w2_EDF):
            assert p.requires_grad
            p.grad = torch.ones_like(p)
        zero_frozen_expert_grads(layer)
    keep = {0: [False, True], 1: [True, False]}
    for rank, layer in enumerate(layers):
        assert layer.experts.expert_offset == 2 * rank
        for p in (layer.experts.w1_EFD, layer.experts.w3_EFD, layer.experts.w2_EDF):
            for row, kept in enumerate(keep[rank]):
                assert bool((p.grad[row] == 1).all()) == kept and bool((p.grad[row] == 0).all()) != kept


def test_adamw_step_leaves_frozen_expert_rows_bit_identical():
    model = esft_model()
    partial = partially_frozen_parameters(model)
    ids = {id(p) for p in partial}
    others = [p for p in model.parameters() if p.requires_grad and id(p) not in ids]
    opt = torch.optim.AdamW([{"params": partial, "weight_decay": 0.0},
                             {"params": others, "weight_decay": 0.1}], lr=1e-2)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for step in range(3):
        opt.zero_grad()
        model(tokens(B=4, S=16, seed=step)).logsumexp(-1).mean().backward()
        zero_frozen_expert_grads(model)
        opt.step()
    for name, p in model.named_parameters():
        if ".experts." not in name:
            assert torch.equal(p, before[name]), name
            continue
        chosen = [1] if name.startswith("layers.0.") else [0, 3]
        for e in range(4):
            assert torch.equal(p[e], before[name][e]) == (e not in chosen), (name, e)


# -- apply_peft, counting, meta ------------------------------------------------------------------


def test_count_parameters_and_summary():
    model = tiny_llm()
    _, total = count_parameters(model)
    assert count_parameters(model) == (total, total)
    summary = apply_peft(model, peft_cfg(method="lora", lora_targets=["layers.*.attn.*"], lora_rank=4))
    # Per layer: wq 32->32, wk 32->16, wv 32->16, wo 32->32; each adds r·(in + out).
    added = 2 * 4 * ((32 + 32) + (32 + 16) + (32 + 16) + (32 + 32))
    assert count_parameters(model) == (added, total + added)
    assert summary == (f"peft lora: 8 modules (rank 4, alpha 8.0); trainable {added:,} of "
                       f"{total + added:,} parameters ({100 * added / (total + added):.2f}%)")
    full = tiny_llm()
    full.requires_grad_(False)
    assert "full fine-tuning" in apply_peft(full, peft_cfg(method="full"))
    assert count_parameters(full) == (total, total)
    with pytest.raises(ValueError, match="expert selection"):
        apply_peft(tiny_llm(), peft_cfg(method="esft"))


def test_adapters_build_and_run_on_meta():
    with torch.device("meta"):
        model = build_model(ModelConfig(**LLM), MoEConfig(**LLM_MOE))
    apply_lora(model, ["layers.*.attn.*", "layers.*.ffn.experts"], rank=4, alpha=8.0)
    apply_perft(model, "R", num_adapters=4, top_k=2, rank=4)
    assert all(p.is_meta for p in model.parameters())
    costs, _ = layer_costs(model, model.moe_cfg)  # the pipeline split still counts every layer
    assert len(costs) == 2
    stage = model.pipeline_stage([1], first=False, last=True)
    assert any(".peft_adapter." in n for n, _ in stage.named_parameters())
    layer = model.layers["0"]
    x_TD = torch.empty(6, 32, device="meta")
    assert layer.attn.wq(x_TD).shape == (6, 32)
    assert layer.ffn.experts(x_TD, torch.tensor([6, 0, 0, 0])).shape == (6, 32)
    assert layer.ffn.peft_adapter(x_TD, None).shape == (6, 32)
    # Variant E gates from the routing: a meta Routing as a pipeline shape pass would give it.
    e_adapter = PerftAdapters(32, "E", num_adapters=4, rank=4, device="meta")
    idx = torch.empty(12, dtype=torch.long, device="meta")
    routing = Routing(idx, idx, torch.empty(12, device="meta"), 6)
    route = RouterOutput(routing, *(torch.empty(6, 4, device="meta"),) * 2, idx, idx, 12)
    assert e_adapter(x_TD, route).shape == (6, 32)
