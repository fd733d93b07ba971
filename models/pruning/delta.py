"""Delta compression between a fine-tuned and a base checkpoint (DARE, DAREx-q, TIES) and
magnitude pruning of expert weights (unstructured, N:M).

State dicts are those of `model.state_dict()` (same keys and shapes for base and fine-tunes);
every floating tensor present in both is compressed, anything else is taken from the fine-tune.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn

from models.moe import moe_layers


def _check_p(p: float) -> None:
    if not 0.0 <= p < 1.0:
        raise ValueError(f"drop rate p must be in [0, 1), got {p}")


def _keep_mask(shape: torch.Size, p: float, generator: torch.Generator | None, device) -> torch.Tensor:
    """Bernoulli(1 − p) keep mask, drawn on the generator's device."""
    where = generator.device if generator is not None else device
    return (torch.rand(shape, generator=generator, device=where) >= p).to(device)


def dare(delta: torch.Tensor, p: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """DARE: drop each entry of `delta` with probability p, rescale the rest by 1/(1 − p), so that
    the expectation is `delta`. p = 0 returns a copy."""
    return darex(delta, p, 1.0 - p, generator)


def darex(delta: torch.Tensor, p: float, q: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """DAREx-q: DARE's drop with probability p, the rest rescaled by 1/q instead of 1/(1 − p)
    (the same generator state draws the same mask as `dare`)."""
    _check_p(p)
    if not q > 0:
        raise ValueError(f"q must be > 0, got {q}")
    if p == 0.0:
        return delta / q if q != 1.0 else delta.clone()
    return delta * _keep_mask(delta.shape, p, generator, delta.device) / q


def _deltas(base_sd: dict, ft_sd: dict) -> list[str]:
    """Keys compressed: floating tensors of the fine-tune present in the base with equal shape."""
    return [k for k, v in ft_sd.items()
            if torch.is_floating_point(v) and k in base_sd and base_sd[k].shape == v.shape]


def dropped_deltas(base_sd: dict, ft_sd: dict, p: float, seed: int = 0) -> dict[str, torch.Tensor]:
    """(ft − base) with DARE's random drop and no rescaling, per compressed key. Each key has its
    own generator seeded by (seed, key), so the masks do not depend on the other keys or on q."""
    _check_p(p)
    out = {}
    for key in _deltas(base_sd, ft_sd):
        delta = ft_sd[key].float() - base_sd[key].float()
        gen = torch.Generator().manual_seed(seed * 1_000_003 + _key_hash(key))
        out[key] = delta if p == 0.0 else delta * _keep_mask(delta.shape, p, gen, delta.device)
    return out


def _key_hash(key: str) -> int:
    """A stable (across processes, unlike hash()) 31-bit integer of a state-dict key."""
    h = 0
    for ch in key.encode():
        h = (h * 131 + ch) % (2 ** 31 - 1)
    return h


def rescaled_state(base_sd: dict, ft_sd: dict, dropped: dict[str, torch.Tensor], q: float) -> dict:
    """base + dropped/q for the compressed keys, the fine-tune's tensors for the rest."""
    out = dict(ft_sd)
    for key, d in dropped.items():
        out[key] = (base_sd[key].float() + d / q).to(ft_sd[key].dtype)
    return out


def dare_state(base_sd: dict, ft_sd: dict, p: float, q: float | None = None, seed: int = 0) -> dict:
    """The fine-tuned state with its delta compressed: DARE (q None: rescale 1/(1 − p)) or
    DAREx-q (rescale 1/q). The same seed drops the same entries whatever q."""
    return rescaled_state(base_sd, ft_sd, dropped_deltas(base_sd, ft_sd, p, seed), 1.0 - p if q is None else q)


@torch.no_grad()
def last_hidden(model: nn.Module, run_forward: Callable[[], object]) -> torch.Tensor:
    """The hidden states before the output head of one forward (`run_forward()` runs the model):
    the final norm's output (LLM) or the final layer's input (DiT)."""
    captured = []
    if hasattr(model, "final_layer"):
        handle = model.final_layer.register_forward_pre_hook(lambda m, args: captured.append(args[0]))
    elif hasattr(model, "norm"):
        handle = model.norm.register_forward_hook(lambda m, args, out: captured.append(out))
    else:
        raise ValueError("last_hidden: the model has neither `final_layer` (DiT) nor `norm` (LLM)")
    try:
        run_forward()
    finally:
        handle.remove()
    return captured[-1].detach().float()


@torch.no_grad()
def tune_darex_q(model: nn.Module, base_sd: dict, ft_sd: dict, p: float, hidden_fn: Callable[[], torch.Tensor],
                 seed: int = 0, num_q: int = 21) -> tuple[float, dict[float, float]]:
    """DAREx-q: the q in [1 − p, 1] whose compressed model's hidden states `hidden_fn()` (e.g.
    `last_hidden` on one calibration batch, in eval mode) are closest (L2) to the fine-tuned
    model's. The num_q candidates are evenly spaced in log q: at p = 0.99 the rescale 1/q spans two
    orders of magnitude, and an even grid in q would jump from 1/q = 100 straight to 17. The model
    is left holding `ft_sd`.

    Returns (best q, {q: error}).
    """
    _check_p(p)
    model.load_state_dict(ft_sd)
    h_ft = hidden_fn()
    dropped = dropped_deltas(base_sd, ft_sd, p, seed)
    errors = {}
    try:
        for q in torch.logspace(math.log10(1.0 - p), 0.0, num_q, dtype=torch.float64).tolist():
            model.load_state_dict(rescaled_state(base_sd, ft_sd, dropped, q))
            errors[q] = (hidden_fn() - h_ft).norm().item()
    finally:
        model.load_state_dict(ft_sd)
    return min(errors, key=errors.get), errors


def _top_magnitude(t: torch.Tensor, density: float) -> torch.Tensor:
    """`t` with all but its round(density·numel) largest magnitudes zeroed."""
    k = round(density * t.numel())
    if k >= t.numel():
        return t.clone()
    out = torch.zeros_like(t)
    if k > 0:
        idx = t.abs().flatten().topk(k).indices
        out.view(-1)[idx] = t.reshape(-1)[idx]
    return out


def ties_merge(base_sd: dict, ft_sds: list[dict], density: float, lam: float = 1.0) -> dict:
    """TIES merging of several fine-tunes of one base: trim each delta to its top `density`
    magnitudes, elect a sign per entry (the sign of the summed trimmed deltas: the side with the
    larger total magnitude), average the trimmed values that agree with it (zeros do not vote),
    scale by λ, add to the base. Keys not compressed in every fine-tune come from the base."""
    if not ft_sds:
        raise ValueError("ties_merge: needs at least one fine-tuned state")
    if not 0.0 < density <= 1.0:
        raise ValueError(f"ties density must be in (0, 1], got {density}")
    keys = set(_deltas(base_sd, ft_sds[0]))
    for sd in ft_sds[1:]:
        keys &= set(_deltas(base_sd, sd))
    out = dict(base_sd)
    for key in keys:
        base = base_sd[key].float()
        trimmed_n = torch.stack([_top_magnitude(sd[key].float() - base, density) for sd in ft_sds])
        sign = torch.sign(trimmed_n.sum(dim=0))
        agree_n = (torch.sign(trimmed_n) == sign) & (trimmed_n != 0)
        merged = (trimmed_n * agree_n).sum(dim=0) / agree_n.sum(dim=0).clamp_min(1)
        out[key] = (base + lam * merged).to(base_sd[key].dtype)
    return out


# -- magnitude pruning -------------------------------------------------------------------------


def magnitude_prune(t: torch.Tensor, sparsity: float) -> torch.Tensor:
    """`t` with its round(sparsity·numel) smallest magnitudes set to zero (exactly that many)."""
    if not 0.0 <= sparsity <= 1.0:
        raise ValueError(f"sparsity must be in [0, 1], got {sparsity}")
    return _top_magnitude(t, 1.0 - sparsity)


def nm_prune(t: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """N:M sparsity along the last (input) dim: in every M consecutive entries the N largest
    magnitudes stay, the others become zero."""
    if not 0 < n <= m or t.shape[-1] % m:
        raise ValueError(f"N:M = {n}:{m} needs 0 < N <= M and M dividing the last dim {t.shape[-1]}")
    groups = t.reshape(*t.shape[:-1], -1, m)
    keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, groups.abs().topk(n, dim=-1).indices, True)
    return (groups * keep).reshape(t.shape)


def parse_nm(text: str) -> tuple[int, int]:
    """"2:4" -> (2, 4)."""
    try:
        n, m = (int(v) for v in text.split(":"))
    except ValueError:
        raise ValueError(f"N:M pattern {text!r}: expected two integers like 2:4") from None
    return n, m


@torch.no_grad()
def magnitude_prune_experts(model: nn.Module, sparsity: float = 0.0, nm: tuple[int, int] | None = None) -> float:
    """Prune the routed experts' weights (w1, w3, w2 of every MoE layer) in place, each expert's
    matrix on its own: `sparsity` of its smallest magnitudes (unstructured), or N:M along its
    input dim when `nm` = (N, M). Returns the share of expert weights now zero."""
    zeros = total = 0
    for layer in moe_layers(model):
        for p in (layer.experts.w1_EFD, layer.experts.w3_EFD, layer.experts.w2_EDF):
            for e in range(p.shape[0]):
                p[e] = nm_prune(p[e], *nm) if nm is not None else magnitude_prune(p[e], sparsity)
            zeros += int((p == 0).sum())
            total += p.numel()
    return zeros / max(total, 1)
