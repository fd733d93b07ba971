"""models/pruning: criteria against direct computations, budgets, pruned == masked original,
config round trip, NAEE vs brute force, merging, dynamic skipping, DARE/DAREx/TIES, N:M."""
from __future__ import annotations

import copy
import itertools
import math

import pytest
import torch
import torch.nn.functional as F

import models
from models.moe import MoE, moe_layers
from models.moe.router import _scores
from models.pruning import (calibrate, choose_kept, dare, dare_state, darex, expert_scores, keep_counts,
                            last_hidden, magnitude_prune, magnitude_prune_experts, merge_experts, naee_kept,
                            nm_prune, prune_experts, pruned_config, skip_betas, ties_merge, tune_darex_q)
from models.config import MoEConfig, ModelConfig
from trainer.config import Config, DataConfig, validate

VOCAB, SEQ = 64, 16
LLM = dict(family="llm", vocab_size=VOCAB, d_model=32, num_layers=2, num_heads=2, num_kv_heads=1, ffn_dim=64,
           max_seq_len=SEQ)
MOE = dict(num_experts=8, top_k=2, expert_ffn_dim=16)


def tiny(moe: dict | None = None, model: dict | None = None, seed: int = 0, dtype=torch.float32):
    cfg = Config(model=ModelConfig(**{**LLM, **(model or {})}), moe=MoEConfig(**{**MOE, **(moe or {})}),
                 data=DataConfig(seq_len=SEQ))
    validate(cfg)
    torch.manual_seed(seed)
    net = models.build_model(cfg.model, cfg.moe).to(dtype)
    return cfg, net.eval()


def batches(n: int = 3, seed: int = 1) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (4, SEQ), generator=gen) for _ in range(n)]


def calib_of(net, data, criteria=("frequency", "reap", "naee"), **kw):
    return calibrate(net, lambda i: net(data[i]), len(data), criteria, **kw)


def layer_inputs(net, data) -> list[torch.Tensor]:
    """Every MoE layer's input rows over `data`, captured independently of calibrate."""
    layers, rows = moe_layers(net), [[] for _ in moe_layers(net)]
    hooks = [layer.register_forward_hook(lambda m, a, o, l=l: rows[l].append(a[0].reshape(-1, a[0].shape[-1])))
             for l, layer in enumerate(layers)]
    with torch.no_grad():
        for tokens in data:
            net(tokens)
    for h in hooks:
        h.remove()
    return [torch.cat(r) for r in rows]


def swiglu(layer: MoE, j: int, x_TD: torch.Tensor) -> torch.Tensor:
    e = layer.experts
    return (F.silu(x_TD @ e.w1_EFD[j].t()) * (x_TD @ e.w3_EFD[j].t())) @ e.w2_EDF[j].t()


# -- criteria ------------------------------------------------------------------------------------


def test_criteria_scores_match_direct_computation():
    cfg, net = tiny()
    data = batches()
    calib = calib_of(net, data)
    for l, (layer, x_TD) in enumerate(zip(moe_layers(net), layer_inputs(net, data))):
        with torch.no_grad():
            probs_TE = torch.softmax(x_TD @ layer.router.gate.weight.t(), dim=-1)
            top_w, top_i = probs_TE.topk(2, dim=-1)
            top_w = top_w / top_w.sum(dim=-1, keepdim=True)  # renormalize (the default)
            E = layer.num_experts
            freq = torch.bincount(top_i.flatten(), minlength=E).double()
            mass = torch.zeros(E, dtype=torch.float64).index_add_(0, top_i.flatten(), top_w.flatten().double())
            reap = torch.zeros(E, dtype=torch.float64)
            for j in range(E):
                tok, slot = (top_i == j).nonzero(as_tuple=True)
                if len(tok):
                    reap[j] = (top_w[tok, slot] * swiglu(layer, j, x_TD[tok]).norm(dim=-1)).double().mean()
        torch.testing.assert_close(expert_scores(net, calib, "frequency")[l], freq)
        torch.testing.assert_close(expert_scores(net, calib, "gate_mass")[l], mass, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(expert_scores(net, calib, "reap")[l], reap, rtol=1e-4, atol=1e-6)
        assert calib.num_tokens[l] == x_TD.shape[0] and freq.sum() == 2 * x_TD.shape[0]
    # router_norm: |‖w_j‖ − ‖w_j^ref‖| against a reference of the router rows before "fine-tuning"
    reference = {k: v.clone() for k, v in net.state_dict().items()}
    with torch.no_grad():
        for layer in moe_layers(net):
            layer.router.gate.weight.mul_(torch.linspace(0.5, 1.5, layer.num_experts)[:, None])
    for l, (name, scores) in enumerate(zip(("layers.0.ffn", "layers.1.ffn"), expert_scores(net, calib, "router_norm",
                                                                                              reference))):
        w, ref = moe_layers(net)[l].router.gate.weight, reference[f"{name}.router.gate.weight"]
        torch.testing.assert_close(scores, (w.norm(dim=1) - ref.norm(dim=1)).abs().double())
        assert scores.argmin() == 3  # the factor closest to 1 (of linspace(0.5, 1.5, 8)): 0.9286
    r0, r0_again, r1 = (expert_scores(net, calib, "random", seed=s) for s in (0, 0, 1))
    assert all(torch.equal(a, b) for a, b in zip(r0, r0_again)) and not torch.equal(r0[0], r1[0])
    assert not torch.equal(r0[0], r0[1])  # layers draw independently


def test_calibration_all_reduce_sums_every_statistic():
    _, net = tiny()
    data = batches(2)
    calib = calib_of(net, data)
    before = [t.clone() for t in calib._summed()]
    calib.all_reduce(lambda flat: flat.mul_(2))  # two identical ranks
    assert all(torch.equal(a, 2 * b) for a, b in zip(calib._summed(), before))


# -- budgets -------------------------------------------------------------------------------------


def test_budgets_per_layer_and_global():
    s0 = torch.tensor([1.0, 2.0, 3.0, 4.0])  # normalised by the mean 2.5: .4 .8 1.2 1.6
    s1 = torch.tensor([10.0, 10.0, 10.0, 50.0])  # mean 20: .5 .5 .5 2.5
    assert choose_kept([s0, s1], 0.25, "per_layer") == [[1, 2, 3], [0, 1, 3]]  # ties: lower id kept
    assert choose_kept([s0, s1], 0.25, "global") == [[1, 2, 3], [0, 1, 3]]  # .4 and one .5 go
    assert choose_kept([s0, s1], 0.5, "global") == [[1, 2, 3], [3]]  # .4 and the three .5
    assert choose_kept([s0, s1], 0.5, "global", min_keep=2) == [[2, 3], [0, 3]]
    # multiple_of (= parallel.ep): blocks of 2 experts, lowest block means first
    assert choose_kept([s0, s1], 0.5, "global", multiple_of=2) == [[2, 3], [0, 3]]
    assert choose_kept([s0, s1], 0.25, "global", multiple_of=2) == [[0, 1, 2, 3], [0, 3]]
    assert keep_counts([8, 8, 6], 0.4) == [5, 5, 4] and keep_counts([8, 8], 0.4, multiple_of=2) == [4, 4]
    assert keep_counts([8], 0.99) == [1] and keep_counts([8], 0.99, min_keep=2) == [2]
    with pytest.raises(ValueError, match="multiple_of"):
        choose_kept([torch.ones(6)], 0.5, multiple_of=4)


# -- pruned model == masked original -------------------------------------------------------------


def masked_router_forward(router, keep_E: torch.Tensor):
    """The original router with the dropped experts' logits at -inf (and never selected)."""
    def forward(x_TD):
        logits_TE = F.linear(x_TD.double(), router.gate.weight.double()).masked_fill(~keep_E, float("-inf"))
        scores_TE, probs_TE = _scores(logits_TE, router.score_func)
        choice_TE = scores_TE if router.expert_bias_E is None else scores_TE + router.expert_bias_E.double()
        idx_TK = choice_TE.masked_fill(~keep_E, float("-inf")).topk(router.top_k, dim=-1).indices
        w_TK = scores_TE.gather(1, idx_TK)
        if router.renormalize:
            w_TK = w_TK / w_TK.sum(dim=-1, keepdim=True)
        return router._output(idx_TK, w_TK * router.routed_scaling_factor, probs_TE, logits_TE)
    return forward


def randomise_bias(net):
    for layer in moe_layers(net):
        if layer.expert_bias_E is not None:
            layer.expert_bias_E.copy_(torch.randn(layer.num_experts) * 0.005)


@pytest.mark.parametrize("moe, kept", [
    ({}, [[0, 2, 3, 5, 6, 7], [1, 2, 4, 6]]),
    ({"score_func": "sigmoid", "renormalize": False, "routed_scaling_factor": 2.0}, [[1, 4, 6], [0, 2, 3, 7]]),
    ({"aux_free": True, "num_shared_experts": 1}, [[0, 1, 7], [2, 3, 4, 5, 6]]),
    ({"top_k": 3}, [[5], [2, 6]]),  # top_k clipped to 1 and 2
    ({"renormalize": False}, [[3], [0, 1, 2, 3, 4, 5, 6, 7]]),
])
def test_pruned_model_equals_masked_original(moe, kept):
    cfg, net = tiny(moe, dtype=torch.float64)
    randomise_bias(net)
    tokens = batches(1)[0]
    pruned = copy.deepcopy(net)
    prune_experts(pruned, kept)
    for layer, ids in zip(moe_layers(net), kept):
        keep_E = torch.zeros(layer.num_experts, dtype=torch.bool)
        keep_E[ids] = True
        layer.router.forward = masked_router_forward(layer.router, keep_E)
    with torch.no_grad():
        torch.testing.assert_close(pruned(tokens), net(tokens), rtol=0, atol=1e-6)
    for layer, ids in zip(moe_layers(pruned), kept):
        assert layer.experts.w1_EFD.shape[0] == layer.router.gate.weight.shape[0] == len(ids)
        assert layer.top_k == layer.router.top_k == min(cfg.moe.top_k, len(ids))


def test_pruned_dit_equals_masked_original():
    cfg = Config(model=ModelConfig(family="dit", d_model=32, num_layers=2, num_heads=2, num_kv_heads=2, ffn_dim=64,
                                   image_size=8, patch_size=2, in_channels=1, num_classes=10),
                 moe=MoEConfig(**MOE, num_shared_experts=1))
    validate(cfg)
    torch.manual_seed(0)
    # fp32: the timestep embedding computes in fp32 whatever the model's dtype
    net = models.build_model(cfg.model, cfg.moe).eval()
    with torch.no_grad():  # adaLN-Zero makes every block the identity at init: leave that
        for p in net.parameters():
            p.normal_(0, 0.2)
    kept = [[0, 3, 4, 7], [1, 2, 5]]
    pruned = copy.deepcopy(net)
    prune_experts(pruned, kept)
    for layer, ids in zip(moe_layers(net), kept):
        keep_E = torch.zeros(8, dtype=torch.bool)
        keep_E[ids] = True
        layer.router.forward = masked_router_forward(layer.router, keep_E)
    x, t, y = torch.randn(3, 1, 8, 8), torch.tensor([5.0, 500.0, 900.0]), torch.tensor([0, 4, 10])
    with torch.no_grad():
        out = pruned(x, t, y)
        torch.testing.assert_close(out, net(x, t, y), rtol=0, atol=1e-6)
        assert out.abs().mean() > 1e-2  # the experts do reach the output


@pytest.mark.parametrize("budget", ["per_layer", "global"])
def test_pruned_config_rebuilds_a_model_that_loads_the_pruned_state(budget):
    cfg, net = tiny({"aux_free": True, "num_shared_experts": 1})
    randomise_bias(net)
    with torch.no_grad():  # four nearly silent experts in layer 1: a global budget prunes there
        moe_layers(net)[1].experts.w2_EDF[:4] *= 1e-3
    data = batches(2)
    calib = calib_of(net, data)
    kept = choose_kept(expert_scores(net, calib, "reap"), 0.25, budget, multiple_of=2)
    prune_experts(net, kept)
    new_cfg = pruned_config(cfg, kept)
    validate(dataclass_with_ep(new_cfg, 2))  # every count shardable over ep = 2
    counts = [len(k) for k in kept]
    if budget == "per_layer":
        assert new_cfg.moe.num_experts == 6 and new_cfg.moe.layer_num_experts == []
    else:
        assert kept == [list(range(8)), [4, 5, 6, 7]]
        assert new_cfg.moe.layer_num_experts == [8, 4] and new_cfg.moe.num_experts == 8
    assert net.moe_cfg == new_cfg.moe
    rebuilt = models.build_model(new_cfg.model, new_cfg.moe).eval()
    rebuilt.load_state_dict(net.state_dict(), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(data[0]), net(data[0]), rtol=0, atol=0)
    assert models.param_counts(rebuilt, new_cfg.moe) == models.param_counts(net, new_cfg.moe)


def dataclass_with_ep(cfg, ep):
    import dataclasses
    return dataclasses.replace(cfg, parallel=dataclasses.replace(cfg.parallel, ep=ep))


def test_param_counts_use_each_layers_experts():
    cfg, net = tiny({"layer_num_experts": [8, 4]})
    total, active = models.param_counts(net, cfg.moe)
    per_expert = 3 * 32 * 16
    assert total - active == (8 - 2) * per_expert + (4 - 2) * per_expert


# -- NAEE ----------------------------------------------------------------------------------------


def layer_error(layer: MoE, ids: list[int], x_RD: torch.Tensor) -> float:
    """‖Z − Ẑ‖² of the real pruned layer (its own forward) against the full one."""
    pruned = copy.deepcopy(layer)
    prune_experts(pruned, [ids])
    with torch.no_grad():
        return ((layer(x_RD) - pruned(x_RD)).double() ** 2).sum().item()


def test_naee_exhaustive_finds_the_best_subset_and_greedy_beats_random():
    _, net = tiny({"num_experts": 6}, dtype=torch.float64)
    data = batches(2)
    calib = calib_of(net, data, max_rows=80)
    assert all(x.shape[0] == 80 for x in calib.inputs)
    kept = naee_kept(net, calib, [3, 3])
    greedy = naee_kept(net, calib, [3, 3], exhaustive_limit=0)
    for l, layer in enumerate(moe_layers(net)):
        x_RD = calib.inputs[l].double()
        errors = {s: layer_error(layer, list(s), x_RD) for s in itertools.combinations(range(6), 3)}
        best = min(errors, key=errors.get)
        assert tuple(kept[l]) == best
        assert errors[tuple(greedy[l])] <= sum(errors.values()) / len(errors)
    # the reduction hook sums candidates' errors over ranks: two identical ranks choose the same
    assert naee_kept(net, calib, [3, 3], all_reduce=lambda err: err.mul_(2)) == kept


# -- merging -------------------------------------------------------------------------------------


def test_merging_identical_experts_is_exact():
    _, net = tiny({"top_k": 1}, dtype=torch.float64)
    with torch.no_grad():
        for layer in moe_layers(net):
            for p in (layer.router.gate.weight, *layer.experts.parameters()):
                p[5] = p[2]
    data = batches(2)
    with torch.no_grad():
        before = net(data[0])
    groups = merge_experts(net, calib_of(net, data), [7, 7])
    assert all([2, 5] in g and len(g) == 7 for g in groups)
    with torch.no_grad():
        torch.testing.assert_close(net(data[0]), before, rtol=0, atol=1e-6)


def test_merge_averages_groups_by_frequency():
    _, net = tiny()
    data = batches(2)
    calib = calib_of(net, data)
    original = [copy.deepcopy(layer) for layer in moe_layers(net)]
    groups = merge_experts(net, calib, [3, 5])
    for layer, orig, layer_groups, load_E in zip(moe_layers(net), original, groups, calib.loads):
        assert sorted(j for g in layer_groups for j in g) == list(range(8))
        for i, g in enumerate(layer_groups):
            rep = max(g, key=lambda j: (load_E[j].item(), -j))
            share = load_E[g] / load_E[g].sum()
            expected = (orig.experts.w2_EDF[g].double() * share[:, None, None]).sum(0).float()
            torch.testing.assert_close(layer.experts.w2_EDF[i], expected)
            torch.testing.assert_close(layer.router.gate.weight[i], orig.router.gate.weight[rep])


# -- dynamic skipping ----------------------------------------------------------------------------


def test_skip_betas_are_median_ratios_and_eval_skipping_drops_weak_second_experts():
    cfg, net = tiny()
    data = batches(2)
    calib = calib_of(net, data)
    betas = skip_betas(calib)
    inputs = layer_inputs(net, data)
    for layer, x_TD, beta in zip(moe_layers(net), inputs, betas):
        w_TK = layer.router(x_TD).topk_weight_TK.detach()
        assert abs(beta - (w_TK[:, 1] / w_TK[:, 0]).median().item()) <= 1.0 / 4096
    # built from the config, the layers carry their β; eval drops exactly the 2nd experts below β·w1
    skip_cfg = pruned_config(cfg, [list(range(8))] * 2)
    skip_cfg.moe.skip_beta = betas
    validate(skip_cfg)
    skipping = models.build_model(skip_cfg.model, skip_cfg.moe)
    skipping.load_state_dict(net.state_dict())
    for layer, x_TD, beta in zip(moe_layers(skipping), inputs, betas):
        assert layer.router.skip_beta == beta
        router = layer.router
        full = router.train()(x_TD)  # train mode: unaffected
        assert full.routing.token_idx_N.numel() == 2 * x_TD.shape[0]
        route = router.eval()(x_TD)
        w_TK, i_TK = route.topk_weight_TK, route.topk_idx_TK
        keep_second_T = w_TK[:, 1] >= beta * w_TK[:, 0]
        expected = {(t, i_TK[t, 0].item()) for t in range(x_TD.shape[0])}
        expected |= {(t, i_TK[t, 1].item()) for t in keep_second_T.nonzero().flatten().tolist()}
        got = set(zip(route.routing.token_idx_N.tolist(), route.routing.expert_idx_N.tolist()))
        assert got == expected
        assert 0.3 < 1 - keep_second_T.float().mean() < 0.7  # β is the median: about half skip
    # eval output = the first expert plus only the kept second experts
    with torch.no_grad():
        layer, x_TD = moe_layers(skipping)[0], inputs[0][:8]
        route = layer.router(x_TD)
        y = sum(w * swiglu(layer, int(j), x_TD[t:t + 1])[0] for t, j, w in
                zip(route.routing.token_idx_N, route.routing.expert_idx_N, route.routing.weight_N))
        torch.testing.assert_close(layer.eval()(x_TD).sum(0), y, rtol=1e-5, atol=1e-6)


# -- delta compression ---------------------------------------------------------------------------


def test_dare_is_unbiased_and_p0_is_identity():
    delta = torch.rand(40, 40) * 2 - 1
    gen = torch.Generator().manual_seed(0)
    draws = torch.stack([dare(delta, 0.5, gen) for _ in range(3000)])
    torch.testing.assert_close(draws.mean(0), delta, rtol=0, atol=0.1)
    assert abs((draws != 0).float().mean().item() - 0.5) < 0.01
    assert torch.equal(dare(delta, 0.0), delta)
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    a, b = dare(delta, 0.9, g1), darex(delta, 0.9, 0.5, g2)  # same mask, other rescale
    torch.testing.assert_close(a * 0.1, b * 0.5)
    _, net = tiny()
    sd = net.state_dict()
    ft = {k: v + 0.01 * torch.randn_like(v) for k, v in sd.items()}
    assert all(torch.equal(dare_state(sd, ft, 0.0)[k], ft[k]) for k in ft)


def test_darex_q_tuning_beats_dare_rescaling():
    _, net = tiny()
    base = {k: v.clone() for k, v in net.state_dict().items()}
    torch.manual_seed(1)
    ft = {k: v + 0.02 * torch.randn_like(v) for k, v in base.items()}
    tokens, p = batches(1)[0], 0.99
    hidden_fn = lambda: last_hidden(net, lambda: net(tokens))  # noqa: E731
    q, errors = tune_darex_q(net, base, ft, p, hidden_fn, seed=0, num_q=11)
    assert all(torch.equal(v, ft[k]) for k, v in net.state_dict().items())  # left fine-tuned
    dare_q = min(errors)  # the grid's first point is 1 − p
    grid = sorted(errors)  # log-spaced from 1 − p to 1: a constant ratio between neighbours
    assert len(grid) == 11 and grid[-1] == pytest.approx(1.0)
    assert [b / a for a, b in zip(grid, grid[1:])] == pytest.approx([(1 / (1 - p)) ** 0.1] * 10)
    assert dare_q == pytest.approx(1 - p) and q > dare_q and errors[q] < errors[dare_q]
    h_ft = hidden_fn()
    for qq in (q, dare_q):  # the errors are those of the compressed models
        net.load_state_dict(dare_state(base, ft, p, qq, seed=0))
        assert (hidden_fn() - h_ft).norm().item() == pytest.approx(errors[qq], rel=1e-5)


def test_ties_merge_on_hand_made_deltas():
    base = {"w": torch.ones(5), "step": torch.tensor(7)}
    deltas = [torch.tensor([3.0, -1.0, 0.5, 2.0, 1.5]),
              torch.tensor([-2.0, -2.0, 0.1, 0.2, 4.0]),
              torch.tensor([0.5, -3.0, 0.0, -0.1, 2.0])]
    fts = [{"w": base["w"] + d, "step": torch.tensor(9)} for d in deltas]
    # density 0.6: each keeps its 3 largest magnitudes
    #   t1 [3, 0, 0, 2, 1.5]   t2 [-2, -2, 0, 0, 4]   t3 [0.5, -3, 0, 0, 2]
    # elected signs of the sums [1.5, -5, 0, 2, 7.5]: + - 0 + +
    # means of the agreeing nonzero values [1.75, -2.5, 0, 2, 2.5]; λ = 0.5, plus the base
    merged = ties_merge(base, fts, density=0.6, lam=0.5)
    torch.testing.assert_close(merged["w"], torch.tensor([1.875, -0.25, 1.0, 2.0, 2.25]))
    assert merged["step"] == 7  # integers come from the base


def test_magnitude_and_nm_pruning():
    torch.manual_seed(0)
    t = torch.randn(6, 16)
    nm = nm_prune(t, 2, 4)
    groups, orig = nm.view(6, 4, 4), t.view(6, 4, 4)
    assert torch.equal((groups != 0).sum(-1), torch.full((6, 4), 2))
    kept_min = orig.abs().masked_fill(groups == 0, float("inf")).min(-1).values
    dropped_max = orig.abs().masked_fill(groups != 0, 0).max(-1).values
    assert (kept_min >= dropped_max).all()  # the 2 largest of every 4 stay
    pruned = magnitude_prune(t, 0.3)
    assert (pruned == 0).sum() == round(0.3 * 96)
    assert pruned[pruned != 0].abs().min() >= t[pruned == 0].abs().max()
    _, net = tiny()
    share = magnitude_prune_experts(net, nm=(2, 4))
    assert share == pytest.approx(0.5)
    w = moe_layers(net)[0].experts.w2_EDF
    assert torch.equal((w.view(8, 32, 4, 4) != 0).sum(-1), torch.full((8, 32, 4), 2))
    _, net = tiny()
    magnitude_prune_experts(net, sparsity=0.25)
    w1 = moe_layers(net)[1].experts.w1_EFD
    assert all((w1[e] == 0).sum() == round(0.25 * w1[e].numel()) for e in range(8))  # per expert
