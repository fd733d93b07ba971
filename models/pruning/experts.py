"""Expert pruning and merging: score experts, choose the kept ones, slice the model.

Shape legend (suffixes on tensor names):
    E  experts of a layer     D  model dim     R  calibration rows of a layer (NAEE)

A pruned model is a plain model of fewer experts: `prune_experts` slices every expert tensor,
the router rows and the aux-free bias in place, and `pruned_config` gives the config that
rebuilds it (moe.num_experts, or moe.layer_num_experts when the layers differ; top_k clipped).
Token-choice routing over the kept experts equals the original routing with the dropped
experts' logits at -inf (dropless: capacity depends on E).
"""
from __future__ import annotations

import copy
import dataclasses
import itertools
import math

import torch
from torch import nn

from models.moe import TopKRouter, moe_layers
from models.pruning.calibrate import RATIO_BINS, Calibration


# -- scores and budgets --------------------------------------------------------------------------


def _layer_names(model: nn.Module) -> list[str]:
    names = {id(m): name for name, m in model.named_modules()}
    return [names[id(layer)] for layer in moe_layers(model)]


def expert_scores(model: nn.Module, calib: Calibration, criterion: str, reference_state: dict | None = None,
                  seed: int = 0) -> list[torch.Tensor]:
    """Per MoE layer, a float64 score [E] per expert (CPU); the lowest are pruned.

    frequency: routed tokens; gate_mass: summed gate weights; reap: mean over routed tokens of
    gate · ‖expert output‖₂; router_norm: | ‖w_j‖₂ − ‖w_j^ref‖₂ | of the router rows against
    `reference_state` (a state dict of the model before fine-tuning, same keys and shapes);
    random: uniform, seeded by `seed` and the layer. NAEE chooses subsets, see `naee_kept`.
    """
    if criterion == "naee":
        raise ValueError("criterion naee scores subsets, not experts: use naee_kept")
    layers = moe_layers(model)
    if criterion == "frequency":
        return [t.cpu().clone() for t in calib.loads]
    if criterion == "gate_mass":
        return [t.cpu().clone() for t in calib.gate_mass]
    if criterion == "reap":
        if "reap" not in calib.criteria:
            raise ValueError("criterion reap: calibrate with 'reap' in criteria (it needs the experts' outputs)")
        return [(s / n.clamp_min(1)).cpu() for s, n in zip(calib.reap_sum, calib.loads)]
    if criterion == "router_norm":
        if reference_state is None:
            raise ValueError("criterion router_norm: needs reference_state (the checkpoint before fine-tuning)")
        scores = []
        for name, layer in zip(_layer_names(model), layers):
            key = f"{name}.router.gate.weight"
            if key not in reference_state:
                raise KeyError(f"router_norm: reference state has no {key}")
            w_ED, ref_ED = layer.router.gate.weight.detach().double().cpu(), reference_state[key].double().cpu()
            if ref_ED.shape != w_ED.shape:
                raise ValueError(f"router_norm: {key} is {tuple(ref_ED.shape)} in the reference, {tuple(w_ED.shape)} here")
            scores.append((w_ED.norm(dim=1) - ref_ED.norm(dim=1)).abs())
        return scores
    if criterion == "random":
        scores = []
        for l, layer in enumerate(layers):
            gen = torch.Generator().manual_seed(seed * 100_003 + l)
            scores.append(torch.rand(layer.router.num_experts, generator=gen, dtype=torch.float64))
        return scores
    raise ValueError(f"unknown criterion {criterion!r}")


def keep_counts(num_experts: list[int], sparsity: float, min_keep: int = 1, multiple_of: int = 1) -> list[int]:
    """Per-layer budget: each layer keeps round((1 − sparsity)·E / m)·m experts (m =
    multiple_of), at least min_keep rounded up to m, at most E."""
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
    m = multiple_of
    floor = max(m, math.ceil(min_keep / m) * m)
    return [min(E, max(floor, round((1.0 - sparsity) * E / m) * m)) for E in num_experts]


def choose_kept(scores: list[torch.Tensor], sparsity: float, budget: str = "per_layer", min_keep: int = 1,
                multiple_of: int = 1) -> list[list[int]]:
    """The experts each layer keeps (ascending ids), dropping the lowest scores.

    per_layer: `keep_counts` per layer. global: scores divided by their layer's mean (a layer's
    average expert scores 1, so layers of different scales and widths compare), then the lowest
    round(sparsity·ΣE / m) blocks of m experts removed over all layers, each layer keeping at
    least min_keep (rounded up to m). Every kept count is a multiple of m = multiple_of (set it
    to parallel.ep: expert parallelism splits each layer's experts evenly).
    """
    Es = [s.numel() for s in scores]
    m = multiple_of
    if any(E % m for E in Es):
        raise ValueError(f"multiple_of={m} does not divide the expert counts {Es}")
    if budget == "per_layer":
        counts = keep_counts(Es, sparsity, min_keep, m)
    elif budget == "global":
        if not 0.0 <= sparsity < 1.0:
            raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
        floor = max(m, math.ceil(min_keep / m) * m)
        # Removable blocks: a layer's m lowest experts, then its next m, ... Block means rise
        # within a layer, so one global sort removes each layer's blocks in order.
        blocks = []
        for l, s in enumerate(scores):
            norm = (s.double() / s.double().mean()) if s.double().mean() > 0 else torch.ones_like(s, dtype=torch.float64)
            ranked = norm.sort().values
            for b in range((Es[l] - floor) // m):
                blocks.append((ranked[b * m:(b + 1) * m].mean().item(), l, b))
        counts = list(Es)
        for _, l, _ in sorted(blocks)[:round(sparsity * sum(Es) / m)]:
            counts[l] -= m
    else:
        raise ValueError(f"budget {budget!r} is not one of per_layer, global")
    # Stable sort by score: ties keep the lower expert id (deterministic across ranks).
    return [sorted(torch.argsort(-s.double(), stable=True)[:k].tolist()) for s, k in zip(scores, counts)]


# -- NAEE: reconstruction-loss subset search ---------------------------------------------------


def _router_subset(router: nn.Module, kept: list[int]) -> nn.Module:
    """A detached copy of `router` restricted to `kept` (eval mode, no skipping)."""
    sub = copy.deepcopy(router)
    _slice_router(sub, torch.tensor(kept, device=router.gate.weight.device))
    sub.skip_beta = 0.0
    return sub.eval()


def _combine(router: nn.Module, kept: list[int], x_RD: torch.Tensor, y_ERD: torch.Tensor) -> torch.Tensor:
    """The layer's routed output on x_RD when only `kept` experts exist (y_ERD: every expert's
    output on every row, precomputed)."""
    routing = router(x_RD).routing
    expert_N = torch.tensor(kept, device=x_RD.device)[routing.expert_idx_N]
    out = torch.zeros(x_RD.shape, dtype=torch.float64, device=x_RD.device)
    return out.index_add_(0, routing.token_idx_N, routing.weight_N.double()[:, None] * y_ERD[expert_N, routing.token_idx_N])


def _set_subset(sub: nn.Module, router: nn.Module, kept: list[int]) -> None:
    idx = torch.tensor(kept, device=router.gate.weight.device)
    sub.gate.weight.data.copy_(router.gate.weight.data[idx])
    if router.gate.bias is not None:  # gpt-oss (moe.router_bias)
        sub.gate.bias.data.copy_(router.gate.bias.data[idx])
    if getattr(router, "expert_bias_E", None) is not None:
        sub.expert_bias_E.copy_(router.expert_bias_E[idx])


@torch.no_grad()
def naee_kept(model: nn.Module, calib: Calibration, counts: list[int], exhaustive_limit: int = 5000,
              all_reduce=None) -> list[list[int]]:
    """NAEE: per layer, the `counts[l]` experts whose layer output on the calibration rows is
    closest (‖Z − Ẑ‖²) to the full layer's, with the other experts removed from routing.

    Exhaustive over all subsets when C(E, count) ≤ exhaustive_limit, else greedy: remove, one at
    a time, the expert whose removal raises the error least. `all_reduce` (optional, sums a
    tensor over data-parallel ranks, in place or returned) adds up every candidate's error over
    the ranks' own rows, so every rank picks the same subset.
    """
    if "naee" not in calib.criteria:
        raise ValueError("naee_kept: calibrate with 'naee' in criteria (it keeps the layer inputs)")
    layers = moe_layers(model)

    def reduced(err: torch.Tensor) -> torch.Tensor:
        if all_reduce is None:
            return err
        out = all_reduce(err)
        return err if out is None else out

    kept_all = []
    for layer, x_RD, k in zip(layers, calib.inputs, counts):
        E = layer.router.num_experts
        if not 1 <= k <= E:
            raise ValueError(f"naee_kept: cannot keep {k} of {E} experts")
        x_RD = x_RD.to(layer.router.gate.weight.device)
        R = x_RD.shape[0]
        # Every expert on every row once; each subset then only re-routes and re-combines.
        x_in = x_RD.to(layer.experts.w1_EFD.dtype).repeat(E, 1)
        counts_E = torch.full((E,), R, dtype=torch.int64, device=x_RD.device)
        y_ERD = layer.experts(x_in, counts_E).double().view(E, R, -1)
        everyone = list(range(E))
        z_RD = _combine(_router_subset(layer.router, everyone), everyone, x_RD, y_ERD)

        def errors(subsets: list[list[int]]) -> torch.Tensor:
            sub = _router_subset(layer.router, subsets[0])
            err = []
            for s in subsets:
                _set_subset(sub, layer.router, s)
                err.append(((z_RD - _combine(sub, s, x_RD, y_ERD)) ** 2).sum())
            return reduced(torch.stack(err))

        if math.comb(E, k) <= exhaustive_limit:
            subsets = [list(c) for c in itertools.combinations(range(E), k)]
            kept = subsets[int(torch.argmin(errors(subsets)))]
        else:
            kept = everyone
            while len(kept) > k:
                candidates = [[j for j in kept if j != drop] for drop in kept]
                kept = candidates[int(torch.argmin(errors(candidates)))]
        kept_all.append(kept)
    return kept_all


# -- slicing -------------------------------------------------------------------------------------


def _slice_router(router: nn.Module, idx: torch.Tensor) -> None:
    if getattr(router, "num_groups", 0):
        raise ValueError("pruning: group-limited routing (moe.num_groups > 0) would break the expert groups")
    E = len(idx)
    router.gate.weight = nn.Parameter(router.gate.weight.detach()[idx].clone(),
                                      requires_grad=router.gate.weight.requires_grad)
    if router.gate.bias is not None:  # gpt-oss (moe.router_bias)
        bias = router.gate.bias
        router.gate.bias = nn.Parameter(bias.detach()[idx].clone(), requires_grad=bias.requires_grad)
    router.gate.out_features = E
    router.num_experts = E
    if isinstance(router, TopKRouter):
        router.top_k = min(router.top_k, E)
        if router.expert_bias_E is not None:
            router.expert_bias_E = router.expert_bias_E[idx].clone()


def _slice_experts(experts: nn.Module, idx: torch.Tensor) -> None:
    """Keep experts `idx` of every parameter (dim 0 = expert, expert LoRA included)."""
    E = experts.num_experts
    for module_name, module in experts.named_modules():
        for name, p in list(module.named_parameters(recurse=False)):
            if p.shape[0] != E:
                raise ValueError(f"expert parameter {module_name}.{name} has dim 0 of {p.shape[0]}, not E={E}")
            setattr(module, name, nn.Parameter(p.detach()[idx].clone(), requires_grad=p.requires_grad))
    experts.num_experts = len(idx)


def pruned_moe_config(moe_cfg, counts: list[int]):
    """`moe_cfg` for MoE layers of `counts` experts: num_experts = the widest, layer_num_experts
    the counts when they differ (empty when equal), top_k clipped to num_experts."""
    if not counts or min(counts) < 1:
        raise ValueError(f"every MoE layer needs >= 1 expert, got {counts}")
    E = max(counts)
    per_layer = [] if len(set(counts)) == 1 else list(counts)
    return dataclasses.replace(moe_cfg, num_experts=E, top_k=min(moe_cfg.top_k, E), layer_num_experts=per_layer)


def pruned_config(cfg, kept: list[list[int]]):
    """The run config (`trainer.config.Config`) that rebuilds the model after
    `prune_experts(model, kept)` (or merging into groups of those counts)."""
    return dataclasses.replace(cfg, moe=pruned_moe_config(cfg.moe, [len(k) for k in kept]))


@torch.no_grad()
def prune_experts(model: nn.Module, kept: list[list[int]]) -> None:
    """Keep experts `kept[l]` (ascending ids) of MoE layer l, in place: expert tensors, router
    rows and aux-free bias sliced, top_k clipped; `model.moe_cfg` updated as `pruned_config`.
    Before expert parallelism and before building an optimizer (parameters are replaced)."""
    layers = moe_layers(model)
    if len(kept) != len(layers):
        raise ValueError(f"kept lists {len(kept)} layers, the model has {len(layers)} MoE layers")
    for l, (layer, ids) in enumerate(zip(layers, kept)):
        E = layer.router.num_experts
        if not ids or sorted(set(ids)) != list(ids) or ids[0] < 0 or ids[-1] >= E:
            raise ValueError(f"MoE layer {l}: kept experts must be ascending, unique ids in [0, {E}), got {ids}")
        if hasattr(layer.experts, "num_global_experts"):
            raise ValueError("prune_experts: experts are sharded by expert parallelism; prune an unsharded model")
        if getattr(layer, "peft_adapter", None) is not None:
            raise ValueError("prune_experts: the layer has PERFT adapters; prune the model without them")
        idx = torch.tensor(ids, device=layer.router.gate.weight.device)
        _slice_router(layer.router, idx)
        _slice_experts(layer.experts, idx)
        layer.num_experts, layer.top_k = len(ids), min(layer.top_k, len(ids))
        layer.pop_stats()  # statistics of the old width would no longer add up
        layer.pop_step_loads()
    if getattr(model, "moe_cfg", None) is not None:
        model.moe_cfg = pruned_moe_config(model.moe_cfg, [len(ids) for ids in kept])


# -- merging -------------------------------------------------------------------------------------


def _logit_similarity(gram_EE: torch.Tensor, score_func: str) -> torch.Tensor:
    """Cosine between the experts' logit columns over the calibration tokens."""
    if score_func == "softmax":
        # Softmax ignores a per-token shift of all logits; centring each token's logits removes
        # it, so that similarity reflects how two experts rank against the others.
        E = gram_EE.shape[0]
        P = torch.eye(E, dtype=gram_EE.dtype, device=gram_EE.device) - 1.0 / E
        gram_EE = P @ gram_EE @ P
    norm_E = gram_EE.diagonal().clamp_min(1e-30).sqrt()
    return gram_EE / norm_E[:, None] / norm_E[None, :]


def _agglomerate(sim_EE: torch.Tensor, num_groups: int) -> list[list[int]]:
    """Average-linkage agglomerative clustering into `num_groups` groups."""
    groups = [[j] for j in range(sim_EE.shape[0])]
    while len(groups) > num_groups:
        best, pair = -math.inf, (0, 1)
        for a, b in itertools.combinations(range(len(groups)), 2):
            s = sim_EE[groups[a]][:, groups[b]].mean().item()
            if s > best:
                best, pair = s, (a, b)
        a, b = pair
        groups[a] = sorted(groups[a] + groups[b])
        del groups[b]
    return groups


@torch.no_grad()
def merge_experts(model: nn.Module, calib: Calibration, counts: list[int]) -> list[list[list[int]]]:
    """Merge each MoE layer's experts into `counts[l]` experts, in place.

    Groups by router-logit similarity (average-linkage agglomerative clustering of the cosine
    between the experts' logit columns); a group becomes one expert whose weights are its
    members' averaged with routing-frequency weights (uniform when none was routed), with the
    router row (and aux-free bias) of its most frequent member. Returns the groups per layer
    (original ids), in the order of the merged model's experts.
    """
    layers = moe_layers(model)
    if len(counts) != len(layers):
        raise ValueError(f"counts lists {len(counts)} layers, the model has {len(layers)} MoE layers")
    kept_all, groups_all = [], []
    for layer, k, gram, load_E in zip(layers, counts, calib.logit_gram, calib.loads):
        E = layer.router.num_experts
        if not 1 <= k <= E:
            raise ValueError(f"merge_experts: cannot merge {E} experts into {k}")
        groups = _agglomerate(_logit_similarity(gram.cpu(), getattr(layer.router, "score_func", "softmax")), k)
        load_E = load_E.cpu()
        # The most frequent member (ties: the lowest id) represents its group.
        reps = [max(g, key=lambda j: (load_E[j].item(), -j)) for g in groups]
        for rep, g in zip(reps, groups):
            share = load_E[g] / load_E[g].sum() if load_E[g].sum() > 0 else torch.full((len(g),), 1.0 / len(g))
            for p in layer.experts.parameters():
                w = share.to(device=p.device, dtype=torch.float64).view(-1, *[1] * (p.dim() - 1))
                p[rep] = (p[g].double() * w).sum(dim=0).to(p.dtype)
        order = sorted(range(k), key=lambda i: reps[i])
        kept_all.append([reps[i] for i in order])
        groups_all.append([groups[i] for i in order])
    prune_experts(model, kept_all)
    return groups_all


# -- dynamic skipping ----------------------------------------------------------------------------


def skip_betas(calib: Calibration) -> list[float]:
    """Per MoE layer, β = the median over calibration tokens of w2/w1 (their two best experts'
    gate weights), read from the histogram to within 1/(2·RATIO_BINS); 0 (off) for a layer
    without a second expert."""
    betas = []
    for hist in calib.ratio_hist:
        total = hist.sum().item()
        if total == 0:
            betas.append(0.0)
            continue
        b = int(torch.searchsorted(hist.cumsum(0), torch.tensor(total / 2, dtype=hist.dtype, device=hist.device)))
        betas.append((min(b, RATIO_BINS - 1) + 0.5) / RATIO_BINS)
    return betas
