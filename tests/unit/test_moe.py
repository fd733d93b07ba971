"""MoE layer: routing, dispatch, losses, aux-loss gradient, statistics."""
from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from models.ffn import FeedForward
from models.moe import (AttachAuxLoss, MoE, load_balancing_loss, moe_layers, pop_router_stats,
                        router_z_loss, set_aux_loss_scale)
from models.config import MoEConfig


def make_moe(d=16, dtype=torch.float32, seed=0, **kw) -> MoE:
    base = dict(num_experts=4, top_k=2, expert_ffn_dim=24, aux_loss_coeff=0.01, z_loss_coeff=0.001)
    torch.manual_seed(seed)
    layer = MoE(d, MoEConfig(**{**base, **kw}))
    layer.init_weights(std=0.5, out_std=0.5)  # large enough that routing is far from ties
    return layer.to(dtype)


def swiglu(x, w1, w3, w2):
    return (F.silu(x @ w1.t()) * (x @ w3.t())) @ w2.t()


def test_one_expert_top1_equals_dense_swiglu():
    layer = make_moe(num_experts=1, top_k=1).eval()
    dense = FeedForward(16, 24)
    with torch.no_grad():
        dense.w1.weight.copy_(layer.experts.w1_EFD[0])
        dense.w3.weight.copy_(layer.experts.w3_EFD[0])
        dense.w2.weight.copy_(layer.experts.w2_EDF[0])
    x = torch.randn(3, 5, 16)
    torch.testing.assert_close(layer(x), dense(x))


def test_uniform_router_topk_all_is_mean_of_experts():
    layer = make_moe(num_experts=4, top_k=4, renormalize=True).eval()
    torch.nn.init.zeros_(layer.router.gate.weight)
    x = torch.randn(7, 16)
    e = layer.experts
    ref = torch.stack([swiglu(x, e.w1_EFD[i], e.w3_EFD[i], e.w2_EDF[i]) for i in range(4)]).mean(0)
    torch.testing.assert_close(layer(x), ref)


def test_moe_matches_per_token_reference_with_shared_expert():
    layer = make_moe(num_experts=5, top_k=2, renormalize=False, num_shared_experts=2,
                     shared_expert_ffn_dim=8).eval()
    x = torch.randn(11, 16)
    probs = torch.softmax(x @ layer.router.gate.weight.t(), -1)
    e, s = layer.experts, layer.shared_experts
    ref = torch.zeros_like(x)
    for t in range(x.shape[0]):
        w, idx = probs[t].topk(2)
        for j in range(2):
            i = idx[j]
            ref[t] += w[j] * swiglu(x[t:t + 1], e.w1_EFD[i], e.w3_EFD[i], e.w2_EDF[i])[0]
    ref += s(x)
    assert s.w1.weight.shape == (16, 16)  # two shared experts of width 8 == one of width 16
    torch.testing.assert_close(layer(x), ref)


def test_losses_match_loop_reference():
    torch.manual_seed(1)
    T, E, K = 13, 6, 2
    logits = torch.randn(T, E)
    probs = torch.softmax(logits, -1)
    idx = probs.topk(K, -1).indices
    counts = [0] * E
    for t in range(T):
        for k in range(K):
            counts[idx[t, k]] += 1
    ref = 0.0
    for i in range(E):
        f_i = counts[i] / (T * K)
        P_i = sum(probs[t, i].item() for t in range(T)) / T
        ref += f_i * P_i
    assert load_balancing_loss(probs, idx, 0.01).item() == pytest.approx(0.01 * E * ref, rel=1e-5)
    z_ref = 0.0
    for t in range(T):
        lse = torch.log(sum(torch.exp(logits[t, i]) for i in range(E))).item()
        z_ref += lse ** 2
    assert router_z_loss(logits, 1e-3).item() == pytest.approx(1e-3 * z_ref / T, rel=1e-5)
    uniform = torch.full((T, E), 1.0 / E)
    balanced = torch.arange(T * K).remainder(E).view(T, K)
    assert load_balancing_loss(uniform, balanced, 0.5).item() == pytest.approx(
        0.5 * E * sum((balanced == i).sum().item() / (T * K) / E for i in range(E)))


def _grads(layer):
    return [p.grad.clone() for p in layer.parameters()]


def _direct_grads(layer, xs, scale):
    """Reference: backprop main/len(xs) + scale·aux the plain way (no AttachAuxLoss)."""
    layer.zero_grad()
    layer.eval()  # eval: the layer attaches nothing; aux is rebuilt here from its router
    total = 0.0
    for x in xs:
        r = layer.router(x)
        aux = load_balancing_loss(r.probs_TE, r.topk_idx_TK, layer.aux_loss_coeff) + \
            router_z_loss(r.logits_TE, layer.z_loss_coeff)
        total = total + (layer(x) ** 2).sum() / len(xs) + scale * aux
    total.backward()
    layer.train()
    return _grads(layer)


@pytest.mark.parametrize("num_micro", [1, 2])
def test_attach_aux_loss_gradient(num_micro):
    layer = make_moe(aux_loss_coeff=0.3, z_loss_coeff=0.05).double().train()
    xs = [torch.randn(9, 16, dtype=torch.float64) for _ in range(num_micro)]
    scale = 1.0 / num_micro
    set_aux_loss_scale(layer, scale)
    layer.zero_grad()
    for x in xs:  # gradient accumulation: each micro-step backprops main / num_micro
        ((layer(x) ** 2).sum() / num_micro).backward()
    attached = _grads(layer)
    direct = _direct_grads(layer, xs, scale)
    for a, d in zip(attached, direct):
        torch.testing.assert_close(a, d)
    # and the aux term really contributes (router grads differ without it)
    layer.zero_grad()
    layer.eval()
    sum(((layer(x) ** 2).sum() / num_micro) for x in xs).backward()
    assert not torch.allclose(layer.router.gate.weight.grad, attached[0])


def test_attach_aux_loss_function():
    y = torch.randn(3, requires_grad=True)
    aux = torch.tensor(2.0, requires_grad=True)
    out = AttachAuxLoss.apply(y, aux, 0.25)
    assert torch.equal(out, y)
    (out * 3).sum().backward()
    assert aux.grad.item() == 0.25
    torch.testing.assert_close(y.grad, torch.full((3,), 3.0))


def test_unused_experts_get_zero_grads():
    layer = make_moe(num_experts=4, top_k=1).train()
    with torch.no_grad():  # every token picks expert 0
        layer.router.gate.weight.zero_()
        layer.router.gate.weight[0, 0] = 10.0
    x = torch.randn(8, 16).abs() + 0.1
    layer(x).sum().backward()
    for name in ("w1_EFD", "w3_EFD", "w2_EDF"):
        g = getattr(layer.experts, name).grad
        assert g is not None and g[0].abs().sum() > 0
        assert torch.count_nonzero(g[1:]) == 0
    assert all(p.grad is not None for p in layer.parameters())


def test_every_expert_chunk_touched_in_graph():
    # The loop backend must run a (possibly empty) matmul for every expert.
    from models.moe.experts import GroupedExperts
    e = GroupedExperts(3, 4, 5)
    e.init_weights(0.1, 0.1)
    x = torch.randn(2, 4)
    y = e(x, torch.tensor([2, 0, 0]))
    y.sum().backward()
    assert y.shape == (2, 4) and torch.count_nonzero(e.w1_EFD.grad[1:]) == 0


def test_gradcheck_float64():
    layer = make_moe(d=6, num_experts=3, top_k=2, expert_ffn_dim=5, num_shared_experts=1,
                     dtype=torch.float64).eval()
    x = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    params = tuple(layer.parameters())

    def f(x, *ps):
        return torch.func.functional_call(layer, dict(zip([n for n, _ in layer.named_parameters()], ps)), (x,))

    assert torch.autograd.gradcheck(f, (x, *params), eps=1e-6, atol=1e-5)
    r = layer.router
    assert torch.autograd.gradcheck(
        lambda lg: load_balancing_loss(torch.softmax(lg, -1), lg.topk(2).indices, 0.1) + router_z_loss(lg, 0.1),
        (torch.randn(5, 3, dtype=torch.float64, requires_grad=True),))
    assert r.gate.weight.dtype == torch.float64


def test_router_output_and_renormalisation():
    layer = make_moe(num_experts=6, top_k=3, renormalize=True)
    out = layer.router(torch.randn(10, 16))
    assert out.topk_idx_TK.shape == (10, 3) and out.probs_TE.shape == (10, 6)
    torch.testing.assert_close(out.topk_weight_TK.sum(-1), torch.ones(10))
    raw = make_moe(num_experts=6, top_k=3, renormalize=False).router(torch.randn(10, 16))
    assert (raw.topk_weight_TK.sum(-1) < 1).all()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert layer.router(torch.randn(4, 16)).logits_TE.dtype == torch.float32


def test_pop_router_stats_keys_and_reset():
    model = torch.nn.Sequential(make_moe(seed=0), make_moe(seed=1)).train()
    assert pop_router_stats(model) == {}
    for _ in range(3):
        model(torch.randn(2, 5, 16)).sum().backward()
    scalars, loads = pop_router_stats(model, with_loads=True)
    assert set(scalars) == {"moe/aux_loss", "moe/z_loss", "moe/load_max_over_mean", "moe/router_entropy",
                            "moe/dropped_fraction", "moe/layer0/load_max_over_mean",
                            "moe/layer1/load_max_over_mean", "moe/layer0/router_entropy",
                            "moe/layer1/router_entropy"}
    assert scalars["moe/dropped_fraction"] == 0.0  # dropless
    assert loads.shape == (2, 4) and loads.sum().item() == 3 * 10 * 2 * 2  # fwds·T·K·layers
    assert scalars["moe/load_max_over_mean"] >= 1.0
    assert 0 < scalars["moe/router_entropy"] <= torch.log(torch.tensor(4.0)).item() + 1e-6
    assert pop_router_stats(model) == {}  # reset
    model.eval()
    with torch.no_grad():
        model(torch.randn(2, 5, 16))
    assert pop_router_stats(model) == {}  # eval forwards are not recorded
    assert len(moe_layers(model)) == 2


def test_aux_stat_equals_attached_value():
    layer = make_moe().train()
    x = torch.randn(6, 16)
    layer(x)
    r = layer.router(x)
    expected = load_balancing_loss(r.probs_TE, r.topk_idx_TK, 0.01).item()
    stats = pop_router_stats(layer)
    assert stats["moe/aux_loss"] == pytest.approx(expected, rel=1e-5)


def test_dispatcher_can_be_swapped():
    layer = make_moe().eval()
    calls = []
    local = layer.dispatcher

    def spy(*args, **kwargs):
        calls.append(1)
        return local(*args, **kwargs)

    layer.dispatcher = spy
    layer(torch.randn(3, 16))
    assert calls and "dispatcher" not in dict(layer.named_modules())
    assert dataclasses.is_dataclass(layer.router(torch.randn(1, 16)))
