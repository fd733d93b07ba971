"""Routers against plain loop references: token choice (softmax/sigmoid, renorm, group-limited,
scaling, jitter), expert choice, capacity dropping and padding, shared-expert gate, config."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from models.moe import MoE, Routing, TopKRouter, pop_router_stats
from models.config import MoEConfig
from trainer.config import ConfigError
from trainer.recipe import load_config


def make_moe(d=8, seed=0, **kw) -> MoE:
    base = dict(num_experts=4, top_k=2, expert_ffn_dim=6, aux_loss_coeff=0.0, z_loss_coeff=0.0)
    torch.manual_seed(seed)
    layer = MoE(d, MoEConfig(**{**base, **kw}))
    layer.init_weights(std=0.5, out_std=0.5)  # large enough that routing is far from ties
    return layer


def expert_out(layer, x_D, e):
    ex = layer.experts
    return (F.silu(x_D @ ex.w1_EFD[e].t()) * (x_D @ ex.w3_EFD[e].t())) @ ex.w2_EDF[e].t()


def combine(layer, x_TD, assignments):
    """Sum of w · expert_e(x_t) over explicit (t, e, w) triples."""
    out = torch.zeros_like(x_TD)
    for t, e, w in assignments:
        out[t] += w * expert_out(layer, x_TD[t], e)
    return out


def ref_scores(x_TD, W_ED, score_func):
    """Per-token lists of scores, computed with Python floats."""
    rows = []
    for t in range(x_TD.shape[0]):
        logits = [float((x_TD[t].double() * W_ED[e].detach().double()).sum()) for e in range(W_ED.shape[0])]
        if score_func == "softmax":
            m = max(logits)
            ex = [math.exp(v - m) for v in logits]
            rows.append([v / sum(ex) for v in ex])
        else:
            rows.append([1.0 / (1.0 + math.exp(-v)) for v in logits])
    return rows


def ref_token_choice(x_TD, W_ED, K, score_func="softmax", renorm=True, scale=1.0, G=0, J=0, bias=None):
    """DeepSeek-V3's procedure transcribed: biased scores pick groups and experts, gate weights
    come from the unbiased scores. Returns per token a list of (expert, weight), best first."""
    E = W_ED.shape[0]
    out = []
    for s in ref_scores(x_TD, W_ED, score_func):
        choice = [s[e] + (float(bias[e]) if bias is not None else 0.0) for e in range(E)]
        allowed = list(range(E))
        if G:
            size = E // G
            group_score = [sum(sorted(choice[g * size:(g + 1) * size], reverse=True)[:2]) for g in range(G)]
            kept = sorted(range(G), key=lambda g: -group_score[g])[:J]
            allowed = [e for e in range(E) if e // size in kept]
        chosen = sorted(allowed, key=lambda e: -choice[e])[:K]
        w = [s[e] for e in chosen]
        if renorm:
            w = [v / sum(w) for v in w]
        out.append([(e, v * scale) for e, v in zip(chosen, w)])
    return out


def check_router_matches(layer, x, ref):
    r = layer.router(x)
    for t, pairs in enumerate(ref):
        assert r.topk_idx_TK[t].tolist() == [e for e, _ in pairs]
        torch.testing.assert_close(r.topk_weight_TK[t], torch.tensor([w for _, w in pairs]), rtol=1e-5, atol=1e-6)
    flat = [(t, e, w) for t, pairs in enumerate(ref) for e, w in pairs]
    torch.testing.assert_close(layer(x), combine(layer, x, flat), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("renorm", [True, False])
def test_softmax_topk_matches_reference(renorm):
    layer = make_moe(num_experts=5, top_k=2, renormalize=renorm).eval()
    x = torch.randn(9, 8)
    check_router_matches(layer, x, ref_token_choice(x, layer.router.gate.weight, 2, renorm=renorm))


@pytest.mark.parametrize("renorm,scale", [(True, 2.5), (False, 1.0)])
def test_sigmoid_group_limited_matches_deepseek_v3(renorm, scale):
    layer = make_moe(num_experts=8, top_k=3, score_func="sigmoid", num_groups=4, topk_group=2,
                     renormalize=renorm, routed_scaling_factor=scale, aux_free=True).eval()
    with torch.no_grad():  # a bias large enough to change which groups and experts win
        layer.router.expert_bias_E.copy_(torch.tensor([0.0, 0.3, -0.4, 0.0, 0.5, 0.0, -0.2, 0.1]))
    x = torch.randn(16, 8)
    ref = ref_token_choice(x, layer.router.gate.weight, 3, "sigmoid", renorm, scale, G=4, J=2,
                           bias=layer.router.expert_bias_E)
    check_router_matches(layer, x, ref)
    for pairs in ref:  # every token's experts lie in at most topk_group groups
        assert len({e // 2 for e, _ in pairs}) <= 2


def test_group_of_one_expert_uses_its_score():
    router = TopKRouter(8, 4, 2, score_func="sigmoid", num_groups=4, topk_group=2)
    x = torch.randn(6, 8)
    ref = ref_token_choice(x, router.gate.weight, 2, "sigmoid", G=4, J=2)
    assert router(x).topk_idx_TK.tolist() == [[e for e, _ in p] for p in ref]


def test_jitter_only_in_training_and_within_bounds():
    router = TopKRouter(1, 3, 1, jitter=0.1)
    with torch.no_grad():
        router.gate.weight.copy_(torch.tensor([[1.0], [2.0], [-1.0]]))
    x = torch.randn(50, 1)
    clean = x @ router.gate.weight.t()
    router.eval()
    torch.testing.assert_close(router(x).logits_TE, clean)
    router.train()
    noisy = router(x).logits_TE
    ratio = noisy[:, 0] / clean[:, 0]  # D = 1: logits = (x·n)·w, so the ratio is the noise n
    assert ((ratio >= 0.9 - 1e-6) & (ratio <= 1.1 + 1e-6)).all() and not torch.allclose(ratio, torch.ones(50))
    torch.testing.assert_close(noisy / noisy[:, :1], clean / clean[:, :1])  # one noise per token


@pytest.mark.parametrize("cf,expected_c", [(1.0, 3), (0.0, 5)])  # 0: top_k (2) is the factor
def test_expert_choice_semantics(cf, expected_c):
    T, E = 10, 4
    layer = make_moe(num_experts=E, top_k=2, routing="expert_choice", capacity_factor=cf,
                     routed_scaling_factor=1.5).train()
    x = torch.randn(T, 8)
    x[0] *= 4.0  # one loud token that several experts want
    C = math.ceil(T * (cf or 2) / E)
    assert C == expected_c
    r = layer.router(x)
    assert torch.bincount(r.routing.expert_idx_N, minlength=E).tolist() == [C] * E
    probs = ref_scores(x, layer.router.gate.weight, "softmax")
    assignments = []
    for e in range(E):
        for t in sorted(range(T), key=lambda t: -probs[t][e])[:C]:
            assignments.append((t, e, 1.5 * probs[t][e]))
    per_token = [sum(1 for a in assignments if a[0] == t) for t in range(T)]
    if cf == 1.0:
        assert min(per_token) == 0 and max(per_token) >= 2  # a token may get 0 or many experts
    torch.testing.assert_close(layer(x), combine(layer, x, assignments), rtol=1e-4, atol=1e-5)
    assert pop_router_stats(layer)["moe/dropped_fraction"] == pytest.approx(per_token.count(0) / T)


def ref_capacity(ref, E, C, policy):
    """Explicit per-expert queues: kept (t, e, w) triples."""
    kept = []
    for e in range(E):
        queue = [(t, w) for t, pairs in enumerate(ref) for ee, w in pairs if ee == e]
        queue.sort(key=(lambda a: (-a[1], a[0])) if policy == "probability" else (lambda a: a[0]))
        kept += [(t, e, w) for t, w in queue[:C]]
    return kept


@pytest.mark.parametrize("policy", ["probability", "position"])
@pytest.mark.parametrize("cf", [0.5, 1.0])
def test_capacity_drop_semantics(policy, cf):
    T, E, K = 12, 4, 2
    layer = make_moe(num_experts=E, top_k=K, capacity_factor=cf, drop_policy=policy).train()
    x = torch.randn(T, 8)
    with torch.no_grad():  # skew the router so that some experts overflow even at cf = 1
        layer.router.gate.weight[0] += 0.5 * x.mean(0)
    ref = ref_token_choice(x, layer.router.gate.weight, K)
    C = math.ceil(T * K * cf / E)
    kept = ref_capacity(ref, E, C, policy)
    r = layer.router(x)
    assert sorted(zip(r.routing.token_idx_N.tolist(), r.routing.expert_idx_N.tolist())) == \
        sorted((t, e) for t, e, _ in kept)
    assert len(kept) < T * K  # something was dropped
    torch.testing.assert_close(layer(x), combine(layer, x, kept), rtol=1e-4, atol=1e-5)
    stats = pop_router_stats(layer)
    assert stats["moe/dropped_fraction"] == pytest.approx(1 - len(kept) / (T * K))
    assert stats["moe/layer0/dropped_fraction"] == stats["moe/dropped_fraction"]


def test_padding_to_capacity_changes_nothing():
    layer = make_moe(num_experts=4, top_k=2, capacity_factor=1.5, pad_to_capacity=True).train()
    x = torch.randn(2, 7, 8)
    seen = []
    layer.experts.register_forward_hook(lambda m, args, out: seen.append((args[0].shape[0], args[1].tolist())))
    results = []
    for pad in (True, False):
        layer.router.pad_to_capacity = pad
        layer.zero_grad()
        torch.manual_seed(0)
        y = layer(x)
        (y ** 2).sum().backward()
        results.append((y.detach(), [p.grad.clone() for p in layer.parameters()]))
    C = math.ceil(14 * 2 * 1.5 / 4)
    assert seen[0] == (4 * C, [C] * 4)  # static shapes: every expert runs C rows
    assert sum(seen[1][1]) == seen[1][0] < 4 * C
    torch.testing.assert_close(results[0][0], results[1][0])
    for a, b in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(a, b)


def test_tokens_without_assignments_get_zero_routed_output():
    layer = make_moe(num_experts=2, top_k=1).eval()
    x = torch.randn(3, 8)
    routing = Routing(torch.tensor([2]), torch.tensor([1]), torch.tensor([0.5]), num_tokens=3)
    y = layer.dispatcher(x, routing, layer.experts)
    torch.testing.assert_close(y[:2], torch.zeros(2, 8))
    torch.testing.assert_close(y[2], 0.5 * expert_out(layer, x[2], 1))


def test_qwen_shared_expert_gate():
    layer = make_moe(num_experts=4, top_k=2, num_shared_experts=1, shared_expert_ffn_dim=5,
                     shared_expert_gate=True).eval()
    assert layer.shared_expert_gate.weight.shape == (1, 8)
    x = torch.randn(6, 8)
    ref = ref_token_choice(x, layer.router.gate.weight, 2)
    routed = combine(layer, x, [(t, e, w) for t, p in enumerate(ref) for e, w in p])
    gate = torch.sigmoid(x @ layer.shared_expert_gate.weight.t())
    torch.testing.assert_close(layer(x), routed + gate * layer.shared_experts(x), rtol=1e-4, atol=1e-5)


def _gradcheck_router_path(layer, T=5):
    """gradcheck w.r.t. the input and the router weight (the routing-specific parameters; the
    experts' gradcheck is in test_moe)."""
    layer = layer.double().eval()
    x = torch.randn(T, layer.router.gate.weight.shape[1], dtype=torch.float64, requires_grad=True)
    w = layer.router.gate.weight.detach().clone().requires_grad_(True)

    def f(x, w):
        return torch.func.functional_call(layer, {"router.gate.weight": w}, (x,))

    assert torch.autograd.gradcheck(f, (x, w), eps=1e-6, atol=1e-5)


def test_gradcheck_sigmoid_group_limited():
    _gradcheck_router_path(make_moe(d=4, num_experts=4, top_k=2, expert_ffn_dim=3, score_func="sigmoid",
                                    num_groups=2, topk_group=1, routed_scaling_factor=2.0))


def test_gradcheck_expert_choice():
    _gradcheck_router_path(make_moe(d=4, num_experts=3, top_k=2, expert_ffn_dim=3, routing="expert_choice",
                                    num_shared_experts=1, shared_expert_gate=True))


def test_config_accepts_new_routing_fields():
    cfg = load_config(None, ["moe.score_func=sigmoid", "moe.num_groups=4", "moe.topk_group=2",
                             "moe.capacity_factor=1.25", "moe.drop_policy=position", "moe.pad_to_capacity=true",
                             "moe.aux_free=true", "moe.routed_scaling_factor=2.5", "moe.router_jitter=0.01"])
    assert cfg.moe.num_groups == 4 and cfg.moe.capacity_factor == 1.25
    assert load_config(None, ["moe.routing=expert_choice"]).moe.routing == "expert_choice"


@pytest.mark.parametrize("overrides,match", [
    (["moe.routing=switch"], r"^moe\.routing: 'switch' is not one of"),
    (["moe.score_func=relu"], r"^moe\.score_func: 'relu' is not one of"),
    (["moe.drop_policy=random"], r"^moe\.drop_policy: "),
    (["moe.num_groups=3", "moe.topk_group=1"], r"moe\.num_groups=3 does not divide moe\.num_experts=8"),
    (["moe.num_groups=4", "moe.topk_group=5"], r"moe\.topk_group=5 must be between 1 and moe\.num_groups=4"),
    (["moe.num_groups=4", "moe.topk_group=1", "moe.top_k=3"], r"^moe\.top_k=3 exceeds"),
    (["moe.topk_group=2"], r"^moe\.topk_group=2 needs moe\.num_groups"),
    (["moe.router_jitter=1.5"], r"^moe\.router_jitter: "),
    (["moe.routed_scaling_factor=0"], r"^moe\.routed_scaling_factor: "),
    (["moe.seq_aux_loss_coeff=-1"], r"^moe\.seq_aux_loss_coeff: must be >= 0"),
    (["moe.pad_to_capacity=true"], r"^moe\.pad_to_capacity: "),
    (["moe.shared_expert_gate=true"], r"^moe\.shared_expert_gate: "),
    (["moe.routing=expert_choice", "moe.aux_free=true"], r"^moe\.aux_free: "),
    (["moe.routing=expert_choice", "moe.num_groups=2", "moe.topk_group=1"], r"^moe\.num_groups: "),
])
def test_config_refuses_bad_routing_fields(overrides, match):
    with pytest.raises(ConfigError, match=match) as err:
        load_config(None, overrides)
    assert "\n" not in str(err.value)


def test_count_ids_is_bincount_in_a_static_shape():
    """The expert loads and counts: bincount's values, and a shape torch.compile traces without a
    graph break (bincount's depends on the data)."""
    from models.moe.router import count_ids

    ids = torch.randint(0, 5, (3, 7), generator=torch.Generator().manual_seed(0))  # ids 5..7 never occur
    assert torch.equal(count_ids(ids, 8), torch.bincount(ids.reshape(-1), minlength=8))
    assert count_ids(torch.zeros(0, dtype=torch.long), 3).tolist() == [0, 0, 0]
    assert count_ids(torch.empty(6, dtype=torch.long, device="meta"), 4).shape == (4,)
    explained = torch._dynamo.explain(lambda t: count_ids(t, 8).float() / t.numel())(ids)  # as losses.py
    assert explained.graph_break_count == 0 and explained.graph_count == 1
