"""Samplers for the objectives of trainer/diffusion/objectives.py, model-agnostic.

`sample(model_fn, objective, shape, y, sampler, steps, ...)` draws x0 from noise with
`model_fn(x_t_BCHW, t_B, y_B) -> out_BKHW` (K = C, or 2C with a learned variance) and returns
(samples, nfe). Diffusion objectives (GaussianDiffusion):
  ddpm           ancestral sampling on `steps` evenly respaced timesteps (guided-diffusion's
                 space_timesteps, one section), learned or posterior variance; NFE = steps.
  ddim           η = 0 on the same timesteps; NFE = steps.
  dpm_solver_pp  DPM-Solver++(2M) (Lu et al. 2022), data prediction, multistep, on discrete
                 timesteps uniform in logSNR; NFE = steps.
Flow objective (FlowMatching), dx/dt = v integrated from t=1 (noise) to t=0 (data):
  euler          NFE = steps.   heun  NFE = 2·steps - 1 (the last step is Euler, as Karras et al.).

clip_denoised (default True, as DiT's pixel-space sampling) clips the x0 predictions of ddpm,
ddim and dpm_solver_pp to [-1, 1]; for DPM-Solver++ that is the static thresholding its authors
pair it with on pixel data. An undertrained ε-model predicts x0 = (x_t - σ·ε̂)/α with α ≈ 0.006
at t = T-1, so unclipped samples can reach |x| ~ 100. Pass clip_denoised=False for data not in
[-1, 1] (latents). The flow samplers never clip: their ODE has no x0 step.

Classifier-free guidance (cfg_scale != 1): the conditional and null-label batches go through
ONE model call of 2B rows, and out = u + s·(c - u) on every output channel (the variance channels
too); such a call counts as one NFE.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
from tqdm.auto import tqdm

from trainer.diffusion.config import DIFFUSION_SAMPLERS, FLOW_SAMPLERS
from trainer.diffusion.objectives import FlowMatching, GaussianDiffusion

SAMPLERS = {**{name: "diffusion" for name in DIFFUSION_SAMPLERS},
            **{name: "flow" for name in FLOW_SAMPLERS}}

ModelFn = Callable[[torch.Tensor, torch.Tensor, "torch.Tensor | None"], torch.Tensor]


def validate_sampler(objective, sampler: str) -> None:
    """Raise a one-line ValueError when `sampler` cannot sample `objective`."""
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}: expected one of {', '.join(SAMPLERS)}")
    is_flow = isinstance(objective, FlowMatching)
    if is_flow and SAMPLERS[sampler] != "flow":
        raise ValueError(f"sampler {sampler!r} is for diffusion objectives; flow uses {' or '.join(FLOW_SAMPLERS)}")
    if not is_flow and SAMPLERS[sampler] != "diffusion":
        raise ValueError(f"sampler {sampler!r} is for the flow objective; diffusion uses "
                         f"{', '.join(DIFFUSION_SAMPLERS)}")


class GuidedModel:
    """model_fn with classifier-free guidance folded in; counts NFE (model calls per sample)."""

    def __init__(self, model_fn: ModelFn, y_B: torch.Tensor | None, cfg_scale: float = 1.0,
                 null_label: int | None = None):
        if cfg_scale != 1.0 and (y_B is None or null_label is None):
            raise ValueError("classifier-free guidance (cfg_scale != 1) needs labels y and a null_label")
        self.model_fn, self.y_B, self.cfg_scale = model_fn, y_B, cfg_scale
        if cfg_scale != 1.0:
            # Labels of the 2B call, built once: the batch's labels, then the "no label" class.
            self.y_2B = torch.cat([y_B, torch.full_like(y_B, null_label)])
        self.nfe = 0

    def __call__(self, x_BCHW: torch.Tensor, t_B: torch.Tensor) -> torch.Tensor:
        self.nfe += 1
        if self.cfg_scale == 1.0:
            return self.model_fn(x_BCHW, t_B, self.y_B)
        out_2BKHW = self.model_fn(torch.cat([x_BCHW, x_BCHW]), torch.cat([t_B, t_B]), self.y_2B)
        cond, uncond = out_2BKHW.chunk(2)
        return uncond + self.cfg_scale * (cond - uncond)


# --------------------------------------------------------------------------- timestep spacing

def space_timesteps(num_timesteps: int, steps: int) -> torch.Tensor:
    """`steps` evenly spaced timesteps of 0..T-1, both ends included (space_timesteps, 1 section)."""
    if not 1 <= steps <= num_timesteps:
        raise ValueError(f"sample steps must be in [1, {num_timesteps}], got {steps}")
    stride = (num_timesteps - 1) / (steps - 1) if steps > 1 else 1.0
    return torch.tensor(sorted({round(i * stride) for i in range(steps)}), dtype=torch.long)


def respace(diffusion: GaussianDiffusion, timesteps_S: torch.Tensor) -> GaussianDiffusion:
    """The S-step process on a subset of timesteps: β'_i = 1 - ᾱ_{t_i} / ᾱ_{t_{i-1}} (ᾱ_{t_{-1}} = 1).

    Its ᾱ'_i equal the original ᾱ_{t_i}, so its tables serve x0/ε conversions at t_i directly.
    """
    acp_S = diffusion.alphas_cumprod[timesteps_S]
    acp_prev_S = torch.cat([acp_S.new_ones(1), acp_S[:-1]])
    return GaussianDiffusion(prediction=diffusion.prediction, betas=1.0 - acp_S / acp_prev_S)


def _nearest_timesteps(lam_T: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Index of the table entry nearest in λ to each target (λ decreasing in t)."""
    lam_asc = lam_T.flip(0)
    hi = torch.searchsorted(lam_asc, targets).clamp(1, len(lam_asc) - 1)
    lo = hi - 1
    pick = torch.where((targets - lam_asc[lo]).abs() <= (lam_asc[hi] - targets).abs(), lo, hi)
    return len(lam_T) - 1 - pick


def logsnr_timesteps(diffusion: GaussianDiffusion, steps: int) -> list[int]:
    """`steps` distinct discrete timesteps from T-1 down to 0, uniform in λ = log(α/σ).

    Uniform logSNR is DPM-Solver's default and the one its authors recommend for few steps on
    low-resolution data (time-uniform for high resolution); our DiTs sample small images/latents.
    Each λ target maps to its nearest table entry. Where the table is coarse in λ (near t=0, and
    the cosine schedule's last step, whose β is clipped to 0.999 and sits ~3.5 below the next λ)
    several targets land on one timestep, so we take the fewest uniform targets that give
    `steps` distinct timesteps: the steps stay uniform in λ wherever the table allows.
    """
    T = diffusion.num_timesteps
    if not 1 <= steps <= T:
        raise ValueError(f"sample steps must be in [1, {T}], got {steps}")
    acp = diffusion.alphas_cumprod
    lam_T = 0.5 * (torch.log(acp) - torch.log1p(-acp))  # decreasing in t

    def distinct(num_targets: int) -> torch.Tensor:
        targets = torch.linspace(float(lam_T[-1]), float(lam_T[0]), num_targets, dtype=torch.float64)
        return _nearest_timesteps(lam_T, targets).unique()

    lo, hi = steps, 64 * T  # bisect for the fewest targets giving >= steps distinct timesteps
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (mid + 1, hi) if len(distinct(mid)) < steps else (lo, mid)
    idx = distinct(lo)
    if len(idx) == steps:
        return idx.flip(0).tolist()
    # The count jumped past `steps` (only when steps is close to T): spread ties apart instead.
    targets = torch.linspace(float(lam_T[-1]), float(lam_T[0]), steps, dtype=torch.float64)
    idx = _nearest_timesteps(lam_T, targets).tolist()
    for j in range(steps - 2, -1, -1):  # strictly decreasing from the end (idx[-1] = 0) ...
        idx[j] = max(idx[j], idx[j + 1] + 1)
    idx[0] = min(idx[0], T - 1)
    for j in range(1, steps):  # ... and within [0, T-1] from the start
        idx[j] = min(idx[j], idx[j - 1] - 1)
    return idx


# --------------------------------------------------------------------------- diffusion samplers

def _randn(shape, generator: torch.Generator | None, like_device, dtype) -> torch.Tensor:
    # Drawn on the generator's device and moved: a CPU generator gives the same samples on any
    # device, and a generator never has to match the sampling device.
    gen_device = generator.device if generator is not None else like_device
    return torch.randn(tuple(shape), generator=generator, device=gen_device, dtype=dtype).to(like_device)


def _full(t: int | float, x_BCHW: torch.Tensor, dtype=torch.long) -> torch.Tensor:
    return torch.full((x_BCHW.shape[0],), t, dtype=dtype, device=x_BCHW.device)


def ddpm_sample(model: GuidedModel, diffusion: GaussianDiffusion, x_BCHW: torch.Tensor, steps: int,
                clip_denoised: bool = True, generator: torch.Generator | None = None,
                progress: bool = False) -> torch.Tensor:
    """Ancestral sampling on `steps` respaced timesteps; the model sees the original t_i."""
    timesteps_S = space_timesteps(diffusion.num_timesteps, steps)
    spaced = respace(diffusion, timesteps_S)
    for i in tqdm(range(len(timesteps_S) - 1, -1, -1), disable=not progress, desc="ddpm"):
        i_B = _full(i, x_BCHW)
        out = model(x_BCHW, diffusion.model_time(_full(int(timesteps_S[i]), x_BCHW)))
        mean, log_var, _ = spaced.p_mean_variance(out.to(x_BCHW.dtype), x_BCHW, i_B, clip_denoised)
        if i > 0:  # the last step returns the mean: no noise is added into x0
            noise = _randn(x_BCHW.shape, generator, x_BCHW.device, x_BCHW.dtype)
            x_BCHW = mean + torch.exp(0.5 * log_var) * noise
        else:
            x_BCHW = mean
    return x_BCHW


def ddim_sample(model: GuidedModel, diffusion: GaussianDiffusion, x_BCHW: torch.Tensor, steps: int,
                clip_denoised: bool = True, progress: bool = False) -> torch.Tensor:
    """Deterministic DDIM (η = 0) on the respaced timesteps; the last step returns x0."""
    timesteps_S = space_timesteps(diffusion.num_timesteps, steps)
    spaced = respace(diffusion, timesteps_S)
    C = x_BCHW.shape[1]
    for i in tqdm(range(len(timesteps_S) - 1, -1, -1), disable=not progress, desc="ddim"):
        i_B = _full(i, x_BCHW)
        out = model(x_BCHW, diffusion.model_time(_full(int(timesteps_S[i]), x_BCHW))).to(x_BCHW.dtype)
        x0, eps = spaced.predict_x0_eps(out[:, :C], x_BCHW, i_B)
        if clip_denoised:
            # ε recomputed from the clipped x0 (as guided-diffusion) keeps x_t = α·x0 + σ·ε exact.
            x0 = x0.clamp(-1, 1)
            eps = spaced.eps_from_x0(x0, x_BCHW, i_B)
        acp_prev = float(spaced.alphas_cumprod_prev[i])
        x_BCHW = math.sqrt(acp_prev) * x0 + math.sqrt(1.0 - acp_prev) * eps
    return x_BCHW


def dpm_solver_pp_sample(model: GuidedModel, diffusion: GaussianDiffusion, x_BCHW: torch.Tensor,
                         steps: int, clip_denoised: bool = True, progress: bool = False,
                         denoise_to_zero: bool = True, spacing: str = "logsnr") -> torch.Tensor:
    """DPM-Solver++(2M), data-prediction form, NFE = steps (Lu et al. 2022, Algorithm 2).

    Time points s_0 = T-1 > ... > s_N = 0 are discrete timesteps, uniform in λ = log(α/σ)
    (spacing="logsnr", default) or in t ("time_uniform"). With D_j = x0_θ(x_j, s_j) and
    h_j = λ_{s_{j+1}} - λ_{s_j}, each step is
        x_{j+1} = (σ_{s_{j+1}} / σ_{s_j})·x_j - α_{s_{j+1}}·(e^{-h_j} - 1)·D̂_j,
    D̂_0 = D_0 (first order: no history yet), then D̂_j = (1 + 1/(2r))·D_j - 1/(2r)·D_{j-1},
    r = h_{j-1}/h_j; D is clipped to [-1, 1] with clip_denoised. denoise_to_zero: the last of the `steps` evaluations is at t=0 and returns
    x0_θ(x, 0), a first-order step to λ = ∞ (second order would extrapolate with weight ∞), so
    the output carries no σ_0 noise; else all `steps` evaluations are solver steps and the output
    is x at t=0 (σ_0 ≈ 0.01 with the linear schedule), the last step first order below 15 steps
    as the authors' lower_order_final.
    """
    C = x_BCHW.shape[1]
    num_points = steps if denoise_to_zero else steps + 1
    if spacing == "logsnr":
        s_N = logsnr_timesteps(diffusion, num_points)
    elif spacing == "time_uniform":
        s_N = space_timesteps(diffusion.num_timesteps, num_points).flip(0).tolist()
    else:
        raise ValueError(f"unknown dpm_solver_pp spacing {spacing!r}: expected logsnr or time_uniform")
    acp = diffusion.alphas_cumprod
    alpha = [math.sqrt(float(acp[s])) for s in s_N]
    sigma = [math.sqrt(1.0 - float(acp[s])) for s in s_N]
    lam = [math.log(a / s) for a, s in zip(alpha, sigma)]
    d_prev, h_prev = None, None
    for j in tqdm(range(steps), disable=not progress, desc="dpm_solver_pp"):
        s_B = _full(s_N[j], x_BCHW)
        out = model(x_BCHW, diffusion.model_time(s_B)).to(x_BCHW.dtype)
        d, _ = diffusion.predict_x0_eps(out[:, :C], x_BCHW, s_B)
        if clip_denoised:
            d = d.clamp(-1, 1)
        if j == len(s_N) - 1:  # denoise_to_zero: the evaluation at t=0 is the output
            return d
        h = lam[j + 1] - lam[j]
        first_order = d_prev is None or (j == steps - 1 and steps < 15)
        if first_order:
            d_hat = d
        else:
            r = h_prev / h
            d_hat = (1 + 1 / (2 * r)) * d - 1 / (2 * r) * d_prev
        x_BCHW = sigma[j + 1] / sigma[j] * x_BCHW - alpha[j + 1] * math.expm1(-h) * d_hat
        d_prev, h_prev = d, h
    return x_BCHW


# --------------------------------------------------------------------------- flow samplers

def flow_sample(model: GuidedModel, flow: FlowMatching, x_BCHW: torch.Tensor, steps: int,
                method: str = "euler", progress: bool = False) -> torch.Tensor:
    """Integrate dx/dt = v(x, t) from t=1 to t=0 on `steps` uniform steps (Euler or Heun)."""
    if steps < 1:
        raise ValueError(f"sample steps must be >= 1, got {steps}")
    ts = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64).tolist()
    for k in tqdm(range(steps), disable=not progress, desc=method):
        t, t_next = ts[k], ts[k + 1]
        dt = t_next - t  # negative: we run time backwards
        v = model(x_BCHW, flow.model_time(_full(t, x_BCHW, torch.float64))).to(x_BCHW.dtype)
        x_euler = x_BCHW + dt * v
        if method == "heun" and k < steps - 1:
            # Trapezoid correction; skipped on the last step (t=0) as Karras et al. do.
            v_next = model(x_euler, flow.model_time(_full(t_next, x_BCHW, torch.float64))).to(x_BCHW.dtype)
            x_BCHW = x_BCHW + dt * 0.5 * (v + v_next)
        else:
            x_BCHW = x_euler
    return x_BCHW


# --------------------------------------------------------------------------- entry point

@torch.no_grad()
def sample(model_fn: ModelFn, objective: GaussianDiffusion | FlowMatching, shape, y: torch.Tensor | None,
           sampler: str, steps: int, cfg_scale: float = 1.0, null_label: int | None = None,
           generator: torch.Generator | None = None, progress: bool = False, *,
           clip_denoised: bool = True, noise: torch.Tensor | None = None,
           device: torch.device | str | None = None,
           dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, int]:
    """Draw samples x0 of `shape` with `sampler`.

    Args:
        model_fn: (x_t_BCHW, t_B float, y_B) -> out_B(C or 2C)HW; t_B as objective.model_time.
        objective: the GaussianDiffusion or FlowMatching the model was trained with.
        y: class labels [B] (None: unconditional).
        sampler, steps: see the module docstring; steps is the NFE except for heun (2·steps - 1).
        cfg_scale, null_label: classifier-free guidance; null_label is the model's "no label"
            class (num_classes).
        generator: drives the initial noise and ddpm's per-step noise (drawn on its device and
            moved, so a CPU generator reproduces the same samples on any device).
        clip_denoised: clip x0 predictions to [-1, 1] in ddpm, ddim and dpm_solver_pp.
        noise: the initial x at the noisiest time (default: drawn from `generator`).
        device, dtype: of the samples (default device: y's, else the generator's, else cpu).
    Returns:
        (samples of `shape`, nfe = model calls per sample).
    """
    validate_sampler(objective, sampler)
    if device is None:
        device = y.device if y is not None else (generator.device if generator is not None else "cpu")
    x_BCHW = noise.to(device=device, dtype=dtype) if noise is not None else _randn(shape, generator, device, dtype)
    model = GuidedModel(model_fn, y, cfg_scale, null_label)
    if sampler == "ddpm":
        x_BCHW = ddpm_sample(model, objective, x_BCHW, steps, clip_denoised, generator, progress)
    elif sampler == "ddim":
        x_BCHW = ddim_sample(model, objective, x_BCHW, steps, clip_denoised, progress)
    elif sampler == "dpm_solver_pp":
        x_BCHW = dpm_solver_pp_sample(model, objective, x_BCHW, steps, clip_denoised, progress)
    else:
        x_BCHW = flow_sample(model, objective, x_BCHW, steps, sampler, progress)
    return x_BCHW, model.nfe
