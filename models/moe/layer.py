"""The MoE feed-forward layer: router -> dispatcher(experts) -> (+ gated shared experts).

Shape legend (suffixes on tensor names):
    B  sequences     S  tokens per sequence     T  tokens (B·S)
    D  model dim     E  routed experts          K  experts per token

Aux losses never appear in the layer's return value: `AttachAuxLoss` hangs them on the output
so that `loss.backward()` on the LM loss alone also back-propagates aux · aux_loss_scale. This
stays correct under gradient accumulation (the trainer sets aux_loss_scale = 1/accum_steps)
and under pipeline parallelism, where a stage only ever sees its output's gradient.
"""
from __future__ import annotations

import torch
from torch import nn

from models.ffn import FeedForward
from models.init import Init, seed_from_global_rng
from models.moe.dispatcher import Dispatcher, LocalDispatcher
from models.moe.experts import ExpertActivation, GroupedExperts
from models.moe.losses import (expert_balance_loss, load_balancing_loss, router_entropy, router_z_loss,
                               sequence_load_balancing_loss)
from models.moe.recompute import is_recomputing
from models.moe.router import RouterOutput, TopKRouter, build_router

# Aux losses by their stats/log name (moe/<name>), each with its own coefficient moe.<name>_coeff.
LOSS_NAMES = ("aux_loss", "seq_aux_loss", "z_loss", "expert_balance_loss")


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


# Run eagerly: traced by torch.compile (2.13, in an MoE layer whose expert loop breaks the graph),
# AttachAuxLoss's backward lost the aux loss's gradient, so the balance and z losses silently
# stopped training the router (tests/unit/test_trainer_compile.py). One graph break per layer.
@torch.compiler.disable
def attach_aux_loss(y: torch.Tensor, aux: torch.Tensor, scale: float) -> torch.Tensor:
    return AttachAuxLoss.apply(y, aux, scale)


class MoE(nn.Module):
    """MoE FFN: token-choice (dropless or with capacity) or expert-choice routing.

    Args:
        d_model: D.
        moe_cfg: a `models.config.MoEConfig` (the routing, balancing and structure fields).

    Attributes set from outside:
        dispatcher: a `Dispatcher`; `LocalDispatcher()` unless parallel/ swaps it.
        aux_loss_scale: gradient given to the aux loss (1/grad_accum_steps in training).
        peft_adapter: None, or PERFT adapters (`models.peft.PerftAdapters`): a module called as
            `peft_adapter(x_TD, route)` whose [T, D] output is added to the layer's output.

    Aux losses (training forwards only): those of LOSS_NAMES whose coefficient is > 0. The
    balance losses (all but z_loss) only apply to token choice; expert choice is balanced by
    construction and ignores their coefficients. seq_aux_loss takes the sequences from the
    input's leading dims ([B, S, D]; a 2-D [T, D] input is one sequence).

    Statistics (training forwards only, detached, reset by `pop_stats`): each active loss,
    router entropy, tokens per expert chosen by the router, dropped assignments. A forward re-run
    by activation checkpointing in backward (`is_recomputing`) records nothing: every forward is
    counted once, so the step loads that drive aux-free balancing stay exact.
    """

    def __init__(self, d_model: int, moe_cfg):
        super().__init__()
        c = moe_cfg
        self.num_experts = c.num_experts
        self.top_k = c.top_k
        token_choice = c.routing == "token_choice"
        self.aux_loss_coeff = c.aux_loss_coeff if token_choice else 0.0
        self.seq_aux_loss_coeff = c.seq_aux_loss_coeff if token_choice else 0.0
        self.expert_balance_loss_coeff = c.expert_balance_loss_coeff if token_choice else 0.0
        self.z_loss_coeff = c.z_loss_coeff
        self.router = build_router(d_model, c)
        self.experts = GroupedExperts(c.num_experts, d_model, c.expert_ffn_dim, c.backend, bias=c.expert_bias,
                                      act=ExpertActivation.from_config(c))
        # n shared SwiGLUs of width F summed == one SwiGLU of width n·F (concatenated hidden).
        shared_dim = c.num_shared_experts * (c.shared_expert_ffn_dim or c.expert_ffn_dim)
        self.shared_experts = FeedForward(d_model, shared_dim) if shared_dim > 0 else None
        # Qwen2-MoE: a per-token scalar sigmoid(x·w) lets the model turn the shared path down.
        use_gate = c.shared_expert_gate and self.shared_experts is not None
        self.shared_expert_gate = nn.Linear(d_model, 1, bias=False) if use_gate else None
        self.dispatcher: Dispatcher = LocalDispatcher()
        self.aux_loss_scale = 1.0
        self.peft_adapter: nn.Module | None = None
        # Index among the MoE layers of the whole model (set by the model; None for a lone layer):
        # names this layer's statistics, also when a pipeline stage holds only some layers.
        self.moe_index: int | None = None
        self._reset_stats()
        self._step_loads_E: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [..., D] (e.g. [B, S, D]); returns the same shape."""
        x_TD = x.reshape(-1, x.shape[-1])
        route = self.router(x_TD)
        # The shared experts go to the dispatcher as `overlap_fn`, so an expert-parallel
        # dispatcher can compute them while routed tokens are in flight.
        shared_fn = (lambda: self._shared(x_TD)) if self.shared_experts is not None else None
        y_TD = self.dispatcher(x_TD, route.routing, self.experts, overlap_fn=shared_fn)
        if self.peft_adapter is not None:  # replicated: under ep each rank adapts its own tokens
            y_TD = y_TD + self.peft_adapter(x_TD, route).to(y_TD.dtype)
        if self.training and x_TD.shape[0] > 0:
            num_seqs = x_TD.shape[0] // x.shape[-2] if x.dim() >= 3 else 1
            aux = self._aux_loss(route, num_seqs)
            if aux is not None and torch.is_grad_enabled() and aux.requires_grad:
                y_TD = attach_aux_loss(y_TD, aux, self.aux_loss_scale)
        return y_TD.reshape(x.shape)

    def _shared(self, x_TD: torch.Tensor) -> torch.Tensor:
        """The shared experts' output, gated per token when the layer has a shared gate."""
        shared_TD = self.shared_experts(x_TD)
        if self.shared_expert_gate is not None:
            shared_TD = torch.sigmoid(self.shared_expert_gate(x_TD)) * shared_TD
        return shared_TD

    def aux_losses(self, route: RouterOutput, num_seqs: int = 1) -> dict[str, torch.Tensor]:
        """The active aux losses of one forward, coefficient included, by name."""
        losses = {}
        if route.topk_idx_TK is not None:  # balance losses: token choice only
            probs_TE, idx_TK = route.probs_TE, route.topk_idx_TK
            if self.aux_loss_coeff > 0:
                losses["aux_loss"] = load_balancing_loss(probs_TE, idx_TK, self.aux_loss_coeff)
            if self.seq_aux_loss_coeff > 0:
                losses["seq_aux_loss"] = sequence_load_balancing_loss(
                    probs_TE.view(num_seqs, -1, probs_TE.shape[-1]),
                    idx_TK.view(num_seqs, -1, idx_TK.shape[-1]), self.seq_aux_loss_coeff)
            if self.expert_balance_loss_coeff > 0:
                losses["expert_balance_loss"] = expert_balance_loss(probs_TE, idx_TK, self.expert_balance_loss_coeff)
        if self.z_loss_coeff > 0:
            losses["z_loss"] = router_z_loss(route.logits_TE, self.z_loss_coeff)
        return losses

    def _aux_loss(self, route: RouterOutput, num_seqs: int) -> torch.Tensor | None:
        losses = self.aux_losses(route, num_seqs)
        if not is_recomputing():  # the original forward counted these tokens already
            self._record(route, {k: v.detach() for k, v in losses.items()})
        return sum(losses.values()) if losses else None

    # -- statistics ----------------------------------------------------------------------------

    def _reset_stats(self) -> None:
        # Plain attributes, not buffers: they must not enter state_dict, and DDP must not
        # broadcast rank 0's values over every rank's own statistics.
        self._num_forwards = 0
        self._num_requested = 0
        self._stats: dict[str, torch.Tensor] = {}

    # Not compiled: the counters are host ints that a compiled graph would specialise on (a recompile
    # per forward); bookkeeping on detached tensors gains nothing from compilation anyway.
    @torch.compiler.disable
    @torch.no_grad()
    def _record(self, route: RouterOutput, losses: dict[str, torch.Tensor]) -> None:
        if route.probs_TE.device.type == "meta":  # shape inference (e.g. a pipeline stage's first
            return                                 # step) routes no real tokens: nothing to count
        loads_E = route.tokens_per_expert_E.float()
        new = {**losses, "entropy": router_entropy(route.probs_TE.detach()), "tokens_per_expert": loads_E,
               "dropped": route.num_dropped.float()}
        for key, value in new.items():  # kept on device: no host sync per forward
            self._stats[key] = self._stats[key] + value if key in self._stats else value.clone()
        self._num_forwards += 1
        self._num_requested += route.num_requested
        # Separate from _stats: the trainer pops these every step for aux-free balancing, the
        # statistics only every log_every steps.
        self._step_loads_E = loads_E.clone() if self._step_loads_E is None else self._step_loads_E + loads_E

    def pop_stats(self) -> dict[str, torch.Tensor] | None:
        """Since the last pop (None if no training forward happened), then reset:
        per-forward means of each active loss (LOSS_NAMES) and `entropy`; `tokens_per_expert`
        [E] summed (router's choice, before capacity drops); `dropped_fraction` = dropped /
        requested over all forwards (see RouterOutput.num_requested)."""
        if self._num_forwards == 0:
            return None
        n, s = self._num_forwards, self._stats
        out = {k: v / n for k, v in s.items() if k in LOSS_NAMES or k == "entropy"}
        out["tokens_per_expert"] = s["tokens_per_expert"]
        out["dropped_fraction"] = s["dropped"] / max(self._num_requested, 1)
        self._reset_stats()
        return out

    def pop_step_loads(self) -> torch.Tensor:
        """Tokens per expert [E] (float, on the router's device) chosen in training forwards since
        the last call; zeros if none. Resets."""
        loads_E = self._step_loads_E
        self._step_loads_E = None
        if loads_E is None:
            return torch.zeros(self.num_experts, device=self.router.gate.weight.device)
        return loads_E

    @property
    def can_drop(self) -> bool:
        """Whether this layer's routing can leave assignments (or tokens) unprocessed."""
        return self.router.can_drop

    @property
    def expert_bias_E(self) -> torch.Tensor | None:
        """The aux-loss-free selection bias, or None when the layer does not use it."""
        return self.router.expert_bias_E if isinstance(self.router, TopKRouter) else None

    @torch.no_grad()
    def init_weights(self, std: float, out_std: float, init: Init | None = None) -> None:
        """N(0, std) for the router, shared gate and experts (outputs N(0, out_std)), by name
        (models/init.py; standalone: from torch's global generator); the aux-free bias zero."""
        init = init or Init(self, seed_from_global_rng())
        init.normal(self.router.gate.weight, std)
        if self.router.gate.bias is not None:
            init.zeros(self.router.gate.bias)
        if self.expert_bias_E is not None and not self.expert_bias_E.is_meta:
            self.expert_bias_E.zero_()  # after to_empty() the buffer holds garbage
        self.experts.init_weights(std, out_std, init)
        if self.shared_experts is not None:
            self.shared_experts.init_weights(std, out_std, init)
        if self.shared_expert_gate is not None:
            init.normal(self.shared_expert_gate.weight, std)
