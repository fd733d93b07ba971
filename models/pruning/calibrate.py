"""Calibration: per-MoE-layer routing statistics gathered while the model runs a few batches.

Shape legend (suffixes on tensor names):
    T  tokens of one forward     D  model dim     E  experts of the layer
    N  kept (token, expert) assignments            R  rows kept for reconstruction (NAEE)
    B  bins of the w2/w1 histogram

Hooks on every MoE layer (and its router) see each forward's `RouterOutput` and layer input. The
statistics are sums, so data-parallel ranks calibrate on their own batches and add theirs up with
`Calibration.all_reduce` (one collective); only NAEE's stored input rows stay per rank (naee_kept
reduces its errors instead). Needs every expert local: calibrate before expert parallelism.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from models.config import PRUNE_CRITERIA as CRITERIA
from models.moe import MoE, moe_layers
from models.moe.dispatcher import permute

RATIO_BINS = 4096  # w2/w1 in [0, 1]: the median is read to within 1/8192


@dataclass
class Calibration:
    """Per MoE layer (the order of `moe_layers(model)`), summed over the calibration forwards.

    loads[l] [E]        kept (token, expert) assignments per expert (routed tokens)
    gate_mass[l] [E]    sum of those assignments' gate weights
    reap_sum[l] [E]     sum of gate · ‖expert output‖₂ over them (with "reap" only, else zeros)
    logit_gram[l] [E, E]  Σ_t logits_tᵀ logits_t (router-logit similarity for merging)
    ratio_hist[l] [B]   histogram of w2/w1 of the token's two best experts (top_k ≥ 2)
    num_tokens[l]       tokens routed
    inputs[l] [R, D]    layer inputs kept for NAEE (with "naee" only; first max_rows, per rank)
    """

    loads: list[torch.Tensor]
    gate_mass: list[torch.Tensor]
    reap_sum: list[torch.Tensor]
    logit_gram: list[torch.Tensor]
    ratio_hist: list[torch.Tensor]
    num_tokens: torch.Tensor
    inputs: list[torch.Tensor] = field(default_factory=list)
    criteria: frozenset[str] = frozenset()

    def _summed(self) -> list[torch.Tensor]:
        return [*self.loads, *self.gate_mass, *self.reap_sum, *self.logit_gram, *self.ratio_hist, self.num_tokens]

    def all_reduce(self, fn: Callable[[torch.Tensor], torch.Tensor | None]) -> None:
        """Apply a sum over ranks to every summed statistic at once: `fn` gets one flat float64
        tensor and reduces it in place (returning None) or returns the reduced tensor."""
        parts = self._summed()
        flat = torch.cat([t.reshape(-1) for t in parts])
        out = fn(flat)
        flat = flat if out is None else out
        offset = 0
        for t in parts:
            t.copy_(flat[offset:offset + t.numel()].view_as(t))
            offset += t.numel()


def _new_calibration(layers: list[MoE], criteria: frozenset[str]) -> Calibration:
    device = layers[0].router.gate.weight.device
    zeros = lambda *shape: torch.zeros(*shape, dtype=torch.float64, device=device)  # noqa: E731
    Es = [layer.router.num_experts for layer in layers]
    return Calibration(loads=[zeros(E) for E in Es], gate_mass=[zeros(E) for E in Es],
                       reap_sum=[zeros(E) for E in Es], logit_gram=[zeros(E, E) for E in Es],
                       ratio_hist=[zeros(RATIO_BINS) for _ in Es], num_tokens=zeros(len(Es)),
                       inputs=[torch.zeros(0, layer.router.gate.weight.shape[1], device=device) for layer in layers],
                       criteria=criteria)


@torch.no_grad()
def _record(calib: Calibration, l: int, layer: MoE, x_TD: torch.Tensor, route, max_rows: int) -> None:
    routing = route.routing
    expert_N, weight_N = routing.expert_idx_N, routing.weight_N.double()
    calib.num_tokens[l] += x_TD.shape[0]
    calib.loads[l].index_add_(0, expert_N, torch.ones_like(weight_N))
    calib.gate_mass[l].index_add_(0, expert_N, weight_N)
    logits_TE = route.logits_TE.double()
    calib.logit_gram[l] += logits_TE.t() @ logits_TE
    if route.topk_weight_TK is not None and route.topk_weight_TK.shape[1] >= 2:
        w_TK = route.topk_weight_TK.double()  # pre-skip, pre-capacity: the router's own choice
        ratio_T = (w_TK[:, 1] / w_TK[:, 0].clamp_min(1e-30)).clamp(0.0, 1.0)
        bin_T = (ratio_T * RATIO_BINS).long().clamp_max(RATIO_BINS - 1)
        calib.ratio_hist[l] += torch.bincount(bin_T, minlength=RATIO_BINS).double()
    if "reap" in calib.criteria:
        # The experts' outputs once more, on the kept assignments only: the dispatcher's own
        # buffers are not reachable from a hook (and may be padded or exchanged).
        x_sorted_ND, order_N, counts_E = permute(x_TD, routing, layer.experts.num_experts)
        y_sorted_ND = layer.experts(x_sorted_ND, counts_E)
        saliency_N = weight_N[order_N] * y_sorted_ND.double().norm(dim=-1)
        calib.reap_sum[l].index_add_(0, expert_N[order_N], saliency_N)
    if "naee" in calib.criteria and calib.inputs[l].shape[0] < max_rows:
        take = max_rows - calib.inputs[l].shape[0]
        rows_RD = x_TD[:take].to(torch.promote_types(x_TD.dtype, torch.float32))
        calib.inputs[l] = torch.cat([calib.inputs[l].to(rows_RD.dtype), rows_RD])


def calibrate(model: torch.nn.Module, run_forward: Callable[[int], object], num_batches: int,
              criteria=CRITERIA, max_rows: int = 1024) -> Calibration:
    """Routing statistics of every MoE layer over `num_batches` forwards.

    Args:
        model: a model with `MoE` layers, all experts local (no expert parallelism).
        run_forward: called as run_forward(i) for i < num_batches; runs the model on batch i
            (its return value is ignored). Runs in eval mode under no_grad.
        criteria: names of CRITERIA that will be asked of the result; "reap" adds a second pass
            through the experts, "naee" keeps up to `max_rows` layer inputs per layer.
    """
    criteria = frozenset(criteria)
    if unknown := criteria - set(CRITERIA):
        raise ValueError(f"unknown criteria {sorted(unknown)}; known: {', '.join(CRITERIA)}")
    layers = moe_layers(model)
    if not layers:
        raise ValueError("calibrate: the model has no MoE layers")
    for layer in layers:
        if hasattr(layer.experts, "num_global_experts"):
            raise ValueError("calibrate: experts are sharded by expert parallelism; calibrate an unsharded model")
    calib = _new_calibration(layers, criteria)
    routes: dict[int, object] = {}

    def router_hook(l):
        def hook(module, args, output):
            routes[l] = output
        return hook

    def layer_hook(l):
        def hook(module, args, output):
            x = args[0]
            _record(calib, l, module, x.reshape(-1, x.shape[-1]), routes.pop(l), max_rows)
        return hook

    handles = []
    for l, layer in enumerate(layers):
        handles.append(layer.router.register_forward_hook(router_hook(l)))
        handles.append(layer.register_forward_hook(layer_hook(l)))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for i in range(num_batches):
                run_forward(i)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return calib
