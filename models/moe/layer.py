"""The MoE feed-forward layer: router -> dispatcher(experts) -> (+ shared experts).

Shape legend (suffixes on tensor names):
    T  tokens (batch and sequence flattened)
    D  model dim
    E  routed experts
    K  experts per token

Aux losses never appear in the layer's return value: `AttachAuxLoss` hangs them on the output
so that `loss.backward()` on the LM loss alone also back-propagates aux · aux_loss_scale. This
stays correct under gradient accumulation (the trainer sets aux_loss_scale = 1/accum_steps)
and under pipeline parallelism, where a stage only ever sees its output's gradient.
"""
from __future__ import annotations

import torch
from torch import nn

from models.ffn import FeedForward
from models.moe.dispatcher import Dispatcher, LocalDispatcher
from models.moe.experts import GroupedExperts
from models.moe.losses import load_balancing_loss, router_entropy, router_z_loss
from models.moe.router import RouterOutput, TopKRouter


class AttachAuxLoss(torch.autograd.Function):
    """Identity on y whose backward also gives `aux` the gradient `scale`.

    Equivalent to adding scale·aux to the final loss, without returning aux to the caller.
    """

    @staticmethod
    def forward(ctx, y: torch.Tensor, aux: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        ctx.scale = scale
        ctx.save_for_backward(aux)
        return y

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor):
        (aux,) = ctx.saved_tensors
        return grad_y, torch.ones_like(aux) * ctx.scale, None


class MoE(nn.Module):
    """Dropless token-choice MoE FFN.

    Args:
        d_model: D.
        moe_cfg: a `trainer.config.MoEConfig` (num_experts, top_k, expert_ffn_dim,
            num_shared_experts, shared_expert_ffn_dim, score_func, renormalize,
            aux_loss_coeff, z_loss_coeff, backend).

    Attributes set from outside:
        dispatcher: a `Dispatcher`; `LocalDispatcher()` unless parallel/ swaps it.
        aux_loss_scale: gradient given to the aux loss (1/grad_accum_steps in training).

    Statistics (training forwards only, detached, reset by `pop_stats`): summed balance and
    z-loss values, tokens per expert, router entropy, number of forwards. A forward re-run by
    activation checkpointing records twice; the per-forward means are unaffected.
    """

    def __init__(self, d_model: int, moe_cfg):
        super().__init__()
        c = moe_cfg
        self.num_experts = c.num_experts
        self.top_k = c.top_k
        self.aux_loss_coeff = c.aux_loss_coeff
        self.z_loss_coeff = c.z_loss_coeff
        self.router = TopKRouter(d_model, c.num_experts, c.top_k, c.renormalize, c.score_func)
        self.experts = GroupedExperts(c.num_experts, d_model, c.expert_ffn_dim, c.backend)
        # n shared SwiGLUs of width F summed == one SwiGLU of width n·F (concatenated hidden).
        shared_dim = c.num_shared_experts * (c.shared_expert_ffn_dim or c.expert_ffn_dim)
        self.shared_experts = FeedForward(d_model, shared_dim) if shared_dim > 0 else None
        self.dispatcher: Dispatcher = LocalDispatcher()
        self.aux_loss_scale = 1.0
        self._reset_stats()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [..., D] (e.g. [B, S, D]); returns the same shape."""
        x_TD = x.reshape(-1, x.shape[-1])
        route = self.router(x_TD)
        y_TD = self.dispatcher(x_TD, route.topk_idx_TK, route.topk_weight_TK, self.experts)
        if self.shared_experts is not None:
            y_TD = y_TD + self.shared_experts(x_TD)
        if self.training and x_TD.shape[0] > 0:
            aux = self._aux_loss(route)
            if torch.is_grad_enabled() and aux.requires_grad:
                y_TD = AttachAuxLoss.apply(y_TD, aux, self.aux_loss_scale)
        return y_TD.reshape(x.shape)

    def _aux_loss(self, route: RouterOutput) -> torch.Tensor:
        balance = load_balancing_loss(route.probs_TE, route.topk_idx_TK, self.aux_loss_coeff)
        z = router_z_loss(route.logits_TE, self.z_loss_coeff)
        self._record(route, balance.detach(), z.detach())
        return balance + z

    # -- statistics ----------------------------------------------------------------------------

    def _reset_stats(self) -> None:
        # Plain attributes, not buffers: they must not enter state_dict, and DDP must not
        # broadcast rank 0's values over every rank's own statistics.
        self._num_forwards = 0
        self._stats: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def _record(self, route: RouterOutput, balance: torch.Tensor, z: torch.Tensor) -> None:
        counts_E = torch.bincount(route.topk_idx_TK.reshape(-1), minlength=self.num_experts)
        new = {"aux_loss": balance, "z_loss": z, "entropy": router_entropy(route.probs_TE.detach()),
               "tokens_per_expert": counts_E.float()}
        for key, value in new.items():  # kept on device: no host sync per forward
            self._stats[key] = self._stats[key] + value if key in self._stats else value.clone()
        self._num_forwards += 1

    def pop_stats(self) -> dict[str, torch.Tensor] | None:
        """Per-forward means of aux_loss, z_loss, entropy and summed tokens_per_expert [E]
        since the last pop (None if no training forward happened); resets them."""
        if self._num_forwards == 0:
            return None
        n = self._num_forwards
        out = {k: (v if k == "tokens_per_expert" else v / n) for k, v in self._stats.items()}
        self._reset_stats()
        return out

    def init_weights(self, std: float, out_std: float) -> None:
        nn.init.normal_(self.router.gate.weight, std=std)
        self.experts.init_weights(std, out_std)
        if self.shared_experts is not None:
            self.shared_experts.init_weights(std, out_std)
