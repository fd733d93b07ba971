"""Routers: token choice (top-k, optionally group-limited) and expert choice.

Shape legend (suffixes on tensor names):
    T  tokens (batch and sequence flattened)
    D  model dim
    E  routed experts
    K  experts chosen per token (top_k)
    G  expert groups (group-limited routing), g experts per group (g = E / G)
    C  tokens per expert (expert choice)
    N  kept (token, expert) assignments, flat

A router turns x_TD into a `RouterOutput`: what the losses and statistics need (logits, a
probability distribution over experts, loads before any dropping) plus a `Routing`, the flat
list of kept assignments the dispatcher executes. Both routers compute in fp32 (or wider).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from models.config import DROP_POLICIES, GROUP_SCORES, ROUTINGS, SCORE_FUNCS
from models.moe.capacity import expert_capacity, keep_within_capacity



def count_ids(ids: torch.Tensor, num_ids: int) -> torch.Tensor:
    """How often each of 0..num_ids-1 occurs in `ids` (int64 [num_ids]): `torch.bincount(ids,
    minlength=num_ids)` for ids below num_ids, in a shape known before the data, so torch.compile
    traces it (bincount's shape depends on the values: a graph break in every MoE layer)."""
    flat = ids.reshape(-1)
    return torch.zeros(num_ids, dtype=torch.int64, device=ids.device).scatter_add_(0, flat, torch.ones_like(flat))


@dataclass
class Routing:
    """Kept (token, expert) assignments; the dispatcher's whole input besides x_TD and experts.

    Token choice lists them token-major (t·K + k, dropped ones removed), expert choice
    expert-major; a dispatcher must not rely on either order (it sorts by expert itself).
    """

    token_idx_N: torch.Tensor  # int64 row of x_TD
    expert_idx_N: torch.Tensor  # int64 expert id
    weight_N: torch.Tensor  # gate weight the expert's output is multiplied by (router dtype)
    num_tokens: int  # T
    pad_to: int = 0  # > 0: run every expert on exactly this many rows (zero rows as padding)


@dataclass
class RouterOutput:
    """Routing decisions for T tokens. Float fields are in router precision (>= fp32)."""

    routing: Routing
    probs_TE: torch.Tensor  # distribution over experts (balance losses, entropy)
    logits_TE: torch.Tensor  # raw router logits (z-loss)
    tokens_per_expert_E: torch.Tensor  # int64 load chosen by the router, before capacity drops
    num_dropped: torch.Tensor  # 0-d int64; see `num_requested`
    num_requested: int  # token choice: T·K assignments; expert choice: T tokens
    topk_idx_TK: torch.Tensor | None = None  # token choice: expert ids, best first (pre-drop)
    topk_weight_TK: torch.Tensor | None = None  # token choice: their gate weights


def _router_logits(router: nn.Module, x_TD: torch.Tensor, jitter: float) -> torch.Tensor:
    """x·Wᵀ in at least fp32; call inside autocast(enabled=False)."""
    # Routing is precision-sensitive (near-ties flip experts, exp overflows in bf16), so the
    # router runs in at least fp32; float64 stays float64 for gradcheck.
    x_TD = x_TD.to(torch.promote_types(x_TD.dtype, torch.float32))
    if jitter > 0 and router.training:
        # Switch Transformer: multiplicative noise on the router input only (not the experts'
        # input) explores routings without perturbing what the experts compute.
        x_TD = x_TD * torch.empty_like(x_TD).uniform_(1.0 - jitter, 1.0 + jitter)
    bias = router.gate.bias  # gpt-oss (moe.router_bias)
    return F.linear(x_TD, router.gate.weight.to(x_TD.dtype), None if bias is None else bias.to(x_TD.dtype))


def _scores(logits_TE: torch.Tensor, score_func: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(scores used for selection and gating, a distribution over experts for the losses)."""
    if score_func == "softmax":
        probs_TE = torch.softmax(logits_TE, dim=-1)
        return probs_TE, probs_TE
    scores_TE = torch.sigmoid(logits_TE)
    # DeepSeek-V3's balance loss normalises the sigmoid scores per token into a distribution.
    return scores_TE, scores_TE / scores_TE.sum(dim=-1, keepdim=True)


class TopKRouter(nn.Module):
    """Token choice: every token picks its top-k experts by score.

    Args:
        d_model, num_experts, top_k: D, E, K.
        renormalize: rescale the k chosen scores to sum to 1 (Mixtral, Qwen2-MoE, DeepSeek-V3)
            or keep them raw (OLMoE, DiT-MoE).
        score_func: "softmax" over experts, or an independent "sigmoid" per expert (DeepSeek-V3).
        num_groups, topk_group: group-limited routing (DeepSeek-V2/V3); 0 = off. The E experts form
            G groups; a token picks its top-k among the experts of its best topk_group groups.
        group_score: a group's score: "top2_sum", the sum of its top-2 expert scores (DeepSeek-V3;
            top-1 if a group has one expert), or "max", its best expert's (DeepSeek-V2).
        routed_scaling_factor: multiplies the final gate weights.
        jitter: eps of the multiplicative router-input noise U[1-eps, 1+eps] (training only).
        aux_free: keep a per-expert bias (buffer `expert_bias_E`, in the state_dict) added to the
            scores for selection only; gate weights use the unbiased scores. `update_expert_bias`
            moves it after every optimizer step.
        aux_free_update_rate: u of that update.
        capacity_factor, drop_policy, pad_to_capacity: see models/moe/capacity.py; 0 = dropless.
        bias: a bias on the router logits (gpt-oss; softmax over all experts then renormalised
            over the top-k equals its softmax over the top-k logits).
        skip_beta: dynamic skipping (NAEE), eval mode only; 0 = off. A token drops its 2nd (and
            any later) expert whose gate weight is below skip_beta × its 1st expert's. The model
            sets it per layer from moe.skip_beta (models/pruning calibrates it).
    """

    def __init__(self, d_model: int, num_experts: int, top_k: int, renormalize: bool = True,
                 score_func: str = "softmax", *, num_groups: int = 0, topk_group: int = 0,
                 group_score: str = "top2_sum",
                 routed_scaling_factor: float = 1.0, jitter: float = 0.0, aux_free: bool = False,
                 aux_free_update_rate: float = 1e-3, capacity_factor: float = 0.0,
                 drop_policy: str = "probability", pad_to_capacity: bool = False, skip_beta: float = 0.0,
                 bias: bool = False):
        super().__init__()
        E = num_experts
        if not 1 <= top_k <= E:
            raise ValueError(f"top_k={top_k} must be between 1 and num_experts={E}")
        if score_func not in SCORE_FUNCS:
            raise ValueError(f"score_func={score_func!r} is not one of {', '.join(SCORE_FUNCS)}")
        if drop_policy not in DROP_POLICIES:
            raise ValueError(f"drop_policy={drop_policy!r} is not one of {', '.join(DROP_POLICIES)}")
        if num_groups > 0 and not (E % num_groups == 0 and 1 <= topk_group <= num_groups
                                   and top_k <= topk_group * (E // num_groups)):
            raise ValueError(f"num_groups={num_groups}, topk_group={topk_group} do not fit "
                             f"num_experts={E}, top_k={top_k}")
        self.num_experts, self.top_k, self.renormalize, self.score_func = E, top_k, renormalize, score_func
        if group_score not in GROUP_SCORES:
            raise ValueError(f"group_score={group_score!r} is not one of {', '.join(GROUP_SCORES)}")
        self.num_groups, self.topk_group, self.group_score = num_groups, topk_group, group_score
        self.routed_scaling_factor, self.jitter = routed_scaling_factor, jitter
        self.aux_free, self.aux_free_update_rate = aux_free, aux_free_update_rate
        self.capacity_factor, self.drop_policy = capacity_factor, drop_policy
        self.pad_to_capacity = pad_to_capacity
        self.skip_beta = skip_beta
        self.gate = nn.Linear(d_model, E, bias=bias)  # bias: gpt-oss's router (moe.router_bias)
        # A None buffer stays out of the state_dict, so checkpoints without aux_free are unchanged.
        self.register_buffer("expert_bias_E", torch.zeros(E) if aux_free else None)

    @property
    def can_drop(self) -> bool:
        return self.capacity_factor > 0

    def select(self, scores_TE: torch.Tensor) -> torch.Tensor:
        """topk_idx_TK, best first, from the (unbiased) scores; selection only, no gradient."""
        choice_TE = scores_TE.detach()
        if self.expert_bias_E is not None:
            choice_TE = choice_TE + self.expert_bias_E.to(choice_TE.dtype)
        if self.num_groups > 0:
            T, G = choice_TE.shape[0], self.num_groups
            choice_TGg = choice_TE.view(T, G, -1)
            if self.group_score == "max":
                group_score_TG = choice_TGg.amax(dim=-1)
            else:
                top2 = min(2, choice_TGg.shape[-1])
                group_score_TG = choice_TGg.topk(top2, dim=-1).values.sum(dim=-1)
            best_group_TJ = group_score_TG.topk(self.topk_group, dim=-1).indices
            keep_TG = torch.zeros_like(group_score_TG, dtype=torch.bool).scatter_(1, best_group_TJ, True)
            # -inf, not 0 (as in the HF port): biased scores can be negative, and an expert of a
            # discarded group must never win.
            choice_TE = choice_TGg.masked_fill(~keep_TG[:, :, None], float("-inf")).view(T, -1)
        return choice_TE.topk(self.top_k, dim=-1).indices

    def forward(self, x_TD: torch.Tensor) -> RouterOutput:
        with torch.autocast(device_type=x_TD.device.type, enabled=False):
            logits_TE = _router_logits(self, x_TD, self.jitter)
            scores_TE, probs_TE = _scores(logits_TE, self.score_func)
            topk_idx_TK = self.select(scores_TE)
            topk_weight_TK = scores_TE.gather(1, topk_idx_TK)
            if self.renormalize:
                topk_weight_TK = topk_weight_TK / topk_weight_TK.sum(dim=-1, keepdim=True)
            if self.routed_scaling_factor != 1.0:
                topk_weight_TK = topk_weight_TK * self.routed_scaling_factor
        return self._output(topk_idx_TK, topk_weight_TK, probs_TE, logits_TE)

    def _output(self, topk_idx_TK, topk_weight_TK, probs_TE, logits_TE) -> RouterOutput:
        T, K = topk_idx_TK.shape
        token_TK = torch.arange(T, device=topk_idx_TK.device)[:, None].expand(T, K)
        capacity = expert_capacity(T * K, self.num_experts, self.capacity_factor, max_rows=T)
        routing = Routing(token_TK.reshape(-1), topk_idx_TK.reshape(-1), topk_weight_TK.reshape(-1), T,
                          pad_to=capacity if self.pad_to_capacity else 0)
        num_dropped = torch.zeros((), dtype=torch.int64, device=topk_idx_TK.device)
        keep_TK = self._skip_mask(topk_weight_TK)
        if self.can_drop:
            # Skipped assignments (eval only) still count against capacity: skipping only ever
            # removes work the plain routing would do.
            in_capacity_TK = keep_within_capacity(topk_idx_TK, topk_weight_TK, capacity, self.drop_policy)
            num_dropped = (~in_capacity_TK).sum()
            keep_TK = in_capacity_TK if keep_TK is None else keep_TK & in_capacity_TK
        if keep_TK is not None:
            keep_N = keep_TK.reshape(-1)
            routing.token_idx_N, routing.expert_idx_N = routing.token_idx_N[keep_N], routing.expert_idx_N[keep_N]
            routing.weight_N = routing.weight_N[keep_N]
        loads_E = count_ids(topk_idx_TK, self.num_experts)
        return RouterOutput(routing, probs_TE, logits_TE, loads_E, num_dropped, T * K,
                            topk_idx_TK, topk_weight_TK)

    def _skip_mask(self, topk_weight_TK: torch.Tensor) -> torch.Tensor | None:
        """Dynamic skipping in eval mode: keep_TK, False where w_k < skip_beta·w_1 (k ≥ 2); None
        when off. The ratio w_k/w_1 is the same before and after renormalisation and scaling, so
        the β calibrated on these weights holds whatever the router's settings."""
        if self.skip_beta <= 0 or self.training or topk_weight_TK.shape[1] < 2:
            return None
        keep_TK = topk_weight_TK >= self.skip_beta * topk_weight_TK[:, :1]
        keep_TK[:, 0] = True  # the best expert always runs
        return keep_TK

    @torch.no_grad()
    def update_expert_bias(self, load_E: torch.Tensor) -> None:
        """Aux-loss-free balancing: bᵢ ← bᵢ + u·sign(mean load − loadᵢ); no-op without aux_free."""
        if self.expert_bias_E is None:
            return
        load_E = load_E.to(device=self.expert_bias_E.device, dtype=torch.float32)
        step_E = self.aux_free_update_rate * torch.sign(load_E.mean() - load_E)
        self.expert_bias_E.copy_(self.expert_bias_E.float() + step_E)

    def extra_repr(self) -> str:
        extra = f", groups={self.num_groups}/{self.topk_group}" if self.num_groups else ""
        extra += f" by {self.group_score}" if self.num_groups and self.group_score != "top2_sum" else ""
        extra += f", capacity_factor={self.capacity_factor}" if self.can_drop else ""
        extra += f", skip_beta={self.skip_beta:.4g}" if self.skip_beta > 0 else ""
        return (f"num_experts={self.num_experts}, top_k={self.top_k}, renormalize={self.renormalize}, "
                f"score_func={self.score_func!r}, aux_free={self.aux_free}{extra}")


class ExpertChoiceRouter(nn.Module):
    """Expert choice (Zhou et al. 2022; EC-DiT, DiffMoE): every expert picks its top-C tokens.

    scores = softmax over experts per token (or sigmoid); C = ceil(T · capacity_factor / E), at
    most T; a token may get 0 or several experts, and its gate weights are its scores times
    `routed_scaling_factor` (no renormalisation: a token has no fixed number of slots). Perfectly
    balanced by construction, so no balance loss is needed. capacity_factor is the mean number
    of experts per token (the layer passes top_k when moe.capacity_factor is 0).

    Not causal: whether token t is picked depends on the scores of every token in the batch,
    later ones included. Fine for diffusion transformers; in a causal LM it leaks the future in
    training and routes differently at generation time.
    """

    can_drop = True  # tokens that no expert picks are reported as dropped

    def __init__(self, d_model: int, num_experts: int, capacity_factor: float, score_func: str = "softmax",
                 routed_scaling_factor: float = 1.0, jitter: float = 0.0, bias: bool = False):
        super().__init__()
        if capacity_factor <= 0:
            raise ValueError(f"capacity_factor={capacity_factor} must be > 0 for expert choice")
        if score_func not in SCORE_FUNCS:
            raise ValueError(f"score_func={score_func!r} is not one of {', '.join(SCORE_FUNCS)}")
        self.num_experts, self.capacity_factor, self.score_func = num_experts, capacity_factor, score_func
        self.routed_scaling_factor, self.jitter = routed_scaling_factor, jitter
        self.gate = nn.Linear(d_model, num_experts, bias=bias)

    def forward(self, x_TD: torch.Tensor) -> RouterOutput:
        T, E = x_TD.shape[0], self.num_experts
        C = expert_capacity(T, E, self.capacity_factor, max_rows=T)
        with torch.autocast(device_type=x_TD.device.type, enabled=False):
            logits_TE = _router_logits(self, x_TD, self.jitter)
            scores_TE, probs_TE = _scores(logits_TE, self.score_func)
            weight_EC, token_EC = scores_TE.t().topk(C, dim=-1)
            weight_EC = weight_EC * self.routed_scaling_factor
        expert_EC = torch.arange(E, device=x_TD.device)[:, None].expand(E, C)
        routing = Routing(token_EC.reshape(-1), expert_EC.reshape(-1), weight_EC.reshape(-1), T)
        num_dropped = (count_ids(routing.token_idx_N, T) == 0).sum()
        loads_E = torch.full((E,), C, dtype=torch.int64, device=x_TD.device)
        return RouterOutput(routing, probs_TE, logits_TE, loads_E, num_dropped, T)

    def extra_repr(self) -> str:
        return (f"num_experts={self.num_experts}, capacity_factor={self.capacity_factor}, "
                f"score_func={self.score_func!r}")


def build_router(d_model: int, moe_cfg) -> nn.Module:
    """The router a `models.config.MoEConfig` asks for."""
    c = moe_cfg
    if c.routing == "expert_choice":
        return ExpertChoiceRouter(d_model, c.num_experts, c.capacity_factor or float(c.top_k),
                                  c.score_func, c.routed_scaling_factor, c.router_jitter, bias=c.router_bias)
    if c.routing != "token_choice":
        raise ValueError(f"routing={c.routing!r} is not one of {', '.join(ROUTINGS)}")
    return TopKRouter(d_model, c.num_experts, c.top_k, c.renormalize, c.score_func,
                      num_groups=c.num_groups, topk_group=c.topk_group, group_score=c.group_score,
                      routed_scaling_factor=c.routed_scaling_factor, jitter=c.router_jitter,
                      aux_free=c.aux_free, aux_free_update_rate=c.aux_free_update_rate,
                      capacity_factor=c.capacity_factor, drop_policy=c.drop_policy,
                      pad_to_capacity=c.pad_to_capacity, bias=c.router_bias)
