"""Balancing: each aux loss against a loop reference, its own log key, exact gradients under
accumulation, and auxiliary-loss-free balancing (bias, update, persistence, step loads)."""
from __future__ import annotations

import pytest
import torch

from models.moe import (MoE, TopKRouter, expert_balance_loss, load_balancing_loss, moe_layers,
                        pop_router_stats, pop_step_loads, router_z_loss, sequence_load_balancing_loss,
                        set_aux_loss_scale, update_aux_free_bias)
from models.config import MoEConfig


def make_moe(d=8, seed=0, **kw) -> MoE:
    base = dict(num_experts=4, top_k=2, expert_ffn_dim=6, aux_loss_coeff=0.0, z_loss_coeff=0.0)
    torch.manual_seed(seed)
    layer = MoE(d, MoEConfig(**{**base, **kw}))
    layer.init_weights(std=0.5, out_std=0.5)
    return layer


def ref_seq_aux(probs_BSE, idx_BSK, coeff):
    B, S, E = probs_BSE.shape
    K = idx_BSK.shape[-1]
    total = 0.0
    for b in range(B):
        seq = 0.0
        for i in range(E):
            count = sum(int(idx_BSK[b, s, k]) == i for s in range(S) for k in range(K))
            P = sum(float(probs_BSE[b, s, i]) for s in range(S)) / S
            seq += (count / (S * K)) * P
        total += E * seq
    return coeff * total / B


def test_sequence_aux_loss_matches_reference():
    torch.manual_seed(0)
    B, S, E, K = 3, 5, 6, 2
    probs = torch.softmax(torch.randn(B, S, E), -1)
    idx = probs.topk(K, -1).indices
    got = sequence_load_balancing_loss(probs, idx, 0.1).item()
    assert got == pytest.approx(ref_seq_aux(probs, idx, 0.1), rel=1e-5)
    # one sequence == the batch-level Switch loss; several: differs in general
    flat = load_balancing_loss(probs.reshape(-1, E), idx.reshape(-1, K), 0.1).item()
    assert sequence_load_balancing_loss(probs.reshape(1, -1, E), idx.reshape(1, -1, K), 0.1).item() == \
        pytest.approx(flat, rel=1e-6)
    assert got != pytest.approx(flat, rel=1e-4)


def test_expert_balance_loss_matches_dit_moe_reference():
    torch.manual_seed(1)
    T, E, K = 11, 5, 3
    probs = torch.softmax(torch.randn(T, E), -1)
    idx = probs.topk(K, -1).indices
    ref = 0.0
    for i in range(E):
        f_prime = E * sum(int(idx[t, k]) == i for t in range(T) for k in range(K)) / (T * K)
        ref += f_prime * sum(float(probs[t, i]) for t in range(T)) / T
    assert expert_balance_loss(probs, idx, 0.01).item() == pytest.approx(0.01 * ref, rel=1e-5)
    assert expert_balance_loss(probs, idx, 0.01).item() == pytest.approx(
        load_balancing_loss(probs, idx, 0.01).item(), rel=1e-6)  # documented equivalence


ALL_COEFFS = dict(aux_loss_coeff=0.1, seq_aux_loss_coeff=0.2, z_loss_coeff=0.05, expert_balance_loss_coeff=0.3)


@pytest.mark.parametrize("score_func", ["softmax", "sigmoid"])
def test_each_loss_logged_on_its_own_key(score_func):
    layer = make_moe(score_func=score_func, **ALL_COEFFS).train()
    x = torch.randn(3, 4, 8)
    layer(x)
    stats = pop_router_stats(layer)
    r = layer.eval().router(x.reshape(-1, 8))
    logits = r.logits_TE.detach()
    probs = torch.softmax(logits, -1) if score_func == "softmax" else \
        torch.sigmoid(logits) / torch.sigmoid(logits).sum(-1, keepdim=True)
    torch.testing.assert_close(r.probs_TE.detach(), probs)
    idx = r.topk_idx_TK
    expected = {
        "moe/aux_loss": load_balancing_loss(probs, idx, 0.1),
        "moe/seq_aux_loss": ref_seq_aux(probs.view(3, 4, 4), idx.view(3, 4, 2), 0.2),
        "moe/z_loss": router_z_loss(logits, 0.05),
        "moe/expert_balance_loss": expert_balance_loss(probs, idx, 0.3),
    }
    for key, value in expected.items():
        assert stats[key] == pytest.approx(float(value), rel=1e-5), key


def test_loss_keys_absent_when_off():
    layer = make_moe(z_loss_coeff=0.01).train()
    layer(torch.randn(2, 3, 8))
    assert {k for k in pop_router_stats(layer) if k.endswith("loss")} == {"moe/z_loss"}
    ec = make_moe(routing="expert_choice", **ALL_COEFFS).train()  # balanced by construction
    ec(torch.randn(2, 3, 8))
    assert {k for k in pop_router_stats(ec) if k.endswith("loss")} == {"moe/z_loss"}


def _grads(layer):
    return [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in layer.parameters()]


@pytest.mark.parametrize("kw", [dict(ALL_COEFFS), dict(ALL_COEFFS, score_func="sigmoid", num_experts=6,
                                                          num_groups=3, topk_group=2, aux_free=True)])
def test_aux_gradient_exact_under_accumulation(kw):
    layer = make_moe(**kw).double().train()
    xs = [torch.randn(2, 4, 8, dtype=torch.float64) for _ in range(2)]
    set_aux_loss_scale(layer, 0.5)
    layer.zero_grad()
    for x in xs:  # two micro-steps, each backprops main / 2; the layer attaches aux · 1/2
        ((layer(x) ** 2).sum() / 2).backward()
    attached = _grads(layer)
    layer.zero_grad()
    layer.eval()  # reference: the plain sum of main/2 and aux/2 (nothing attached in eval)
    total = 0.0
    for x in xs:
        aux = sum(layer.aux_losses(layer.router(x.reshape(-1, 8)), num_seqs=2).values())
        total = total + (layer(x) ** 2).sum() / 2 + 0.5 * aux
    total.backward()
    for a, d in zip(attached, _grads(layer)):
        torch.testing.assert_close(a, d)
    assert len(layer.aux_losses(layer.router(xs[0].reshape(-1, 8)))) == 4


def test_aux_free_bias_changes_selection_not_weights():
    layer = make_moe(num_experts=4, top_k=2, renormalize=False, aux_free=True).eval()
    x = torch.randn(10, 8)
    probs = torch.softmax(x @ layer.router.gate.weight.t(), -1)
    with torch.no_grad():
        layer.router.expert_bias_E.copy_(torch.tensor([0.0, 0.0, 0.0, 5.0]))
    r = layer.router(x)
    assert (r.topk_idx_TK[:, 0] == 3).all()  # the bias decides selection ...
    torch.testing.assert_close(r.topk_weight_TK, probs.gather(1, r.topk_idx_TK))  # ... not the weights
    assert not torch.equal(r.topk_idx_TK, probs.topk(2).indices)


def test_aux_free_update_direction_and_magnitude():
    model = torch.nn.Sequential(make_moe(aux_free=True, aux_free_update_rate=0.01), make_moe(seed=1))
    loads = torch.tensor([[6.0, 0.0, 3.0, 3.0], [1.0, 2.0, 3.0, 4.0]])  # layer 0 mean 3
    update_aux_free_bias(model, loads)
    update_aux_free_bias(model, loads)
    torch.testing.assert_close(model[0].router.expert_bias_E, torch.tensor([-0.02, 0.02, 0.0, 0.0]))
    assert model[1].expert_bias_E is None and "router.expert_bias_E" not in model[1].state_dict()
    with pytest.raises(ValueError, match="rows"):
        update_aux_free_bias(model, loads[:1])


def test_aux_free_bias_persists_and_initialises():
    layer = make_moe(aux_free=True)
    with torch.no_grad():
        layer.router.expert_bias_E.copy_(torch.tensor([0.1, -0.2, 0.3, 0.0]))
    state = layer.state_dict()
    assert "router.expert_bias_E" in state
    fresh = make_moe(aux_free=True, seed=3)
    fresh.load_state_dict(state)
    torch.testing.assert_close(fresh.router.expert_bias_E, torch.tensor([0.1, -0.2, 0.3, 0.0]))
    with torch.device("meta"):
        meta = MoE(8, MoEConfig(num_experts=4, top_k=2, expert_ffn_dim=6, aux_free=True))
    meta.to_empty(device="cpu")
    meta.init_weights(0.02, 0.02)
    assert torch.count_nonzero(meta.router.expert_bias_E) == 0


def test_pop_step_loads_and_bias_stats():
    model = torch.nn.Sequential(make_moe(aux_free=True), make_moe(seed=1)).train()
    assert pop_step_loads(model).shape == (2, 4) and pop_step_loads(model).sum() == 0
    for _ in range(2):
        model(torch.randn(2, 3, 8))
    loads = pop_step_loads(model)
    assert loads.dtype == torch.float32 and loads.shape == (2, 4)
    assert loads.sum(1).tolist() == [2 * 6 * 2] * 2  # forwards · tokens · top_k, per layer
    assert pop_step_loads(model).sum() == 0  # reset
    model.eval()
    model(torch.randn(2, 3, 8))
    assert pop_step_loads(model).sum() == 0  # eval forwards are not counted
    model.train()
    model(torch.randn(2, 3, 8))
    update_aux_free_bias(model, pop_step_loads(model))
    stats = pop_router_stats(model)  # popping stats leaves step loads alone and vice versa
    b = moe_layers(model)[0].router.expert_bias_E
    assert stats["moe/aux_free_bias_abs_mean"] == pytest.approx(b.abs().mean().item())
    assert stats["moe/aux_free_bias_abs_max"] == pytest.approx(b.abs().max().item()) == 1e-3


def test_aux_free_balancing_reduces_imbalance():
    torch.manual_seed(0)
    router = TopKRouter(8, 8, 2, score_func="sigmoid", aux_free=True, aux_free_update_rate=0.02)
    with torch.no_grad():
        router.gate.weight.normal_(std=0.3)
        router.gate.weight[0] += 0.5  # a popular expert
    x = torch.randn(256, 8).abs()

    def max_vio():
        load = torch.bincount(router(x).topk_idx_TK.reshape(-1), minlength=8).float()
        return ((load.max() - load.mean()) / load.mean()).item(), load

    before, _ = max_vio()
    for _ in range(60):
        router.update_expert_bias(max_vio()[1])
    after, _ = max_vio()
    assert after < 0.5 * before
