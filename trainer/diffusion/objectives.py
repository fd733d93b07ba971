"""Diffusion and flow-matching training objectives, model-agnostic.

The model is never called here: the trainer calls it (a pipeline-parallel trainer calls its
stages itself) and hands the output to `loss`. The model convention is
`model_fn(x_t_BCHW, model_time(t_B), y_B) -> out_BKHW` with K = C, or K = 2C when it also
predicts the variance (DiT's learn_sigma: [:C] the ε prediction, [C:] the interpolation v).

Shape suffixes: B batch, C image channels, K model output channels (C or 2C), H/W height/width,
T number of diffusion timesteps. Tables are float64 (as guided-diffusion keeps them in numpy) and
cast to the working dtype (fp32 at least) when gathered, so bf16 model outputs still get fp32
losses.

GaussianDiffusion: DDPM (Ho et al. 2020) with ε- or v-prediction (Salimans & Ho 2022) and the
learned-range variance of improved DDPM (Nichol & Dhariwal 2021) as DiT trains it:
loss = MSE(ε) + vlb_weight · VLB(variance only). FlowMatching: rectified flow,
x_t = (1 - t)·x0 + t·ε, target velocity ε - x0, t ~ logit-normal (SD3).
"""
from __future__ import annotations

import math

import torch

LEARN_SIGMA_ERROR = ("learn_sigma (2C output channels) is only supported with objective ddpm "
                     "(ε-prediction); set model.learn_sigma false for objective v or flow")


def mean_flat(x_BCHW: torch.Tensor) -> torch.Tensor:
    """Mean over all but the batch dimension: per-sample losses the caller averages."""
    return x_BCHW.mean(dim=tuple(range(1, x_BCHW.ndim)))


def _work_dtype(x: torch.Tensor) -> torch.dtype:
    # Losses and sampler arithmetic run in fp32 at least; float64 stays float64 (exact tests).
    return torch.promote_types(x.dtype, torch.float32)


def _extract(table_T: torch.Tensor, t_B: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """table[t] for each sample, shaped [B, 1, 1, ...] to broadcast against `like`."""
    vals_B = table_T.to(device=t_B.device)[t_B].to(like.dtype)
    return vals_B.view(-1, *([1] * (like.ndim - 1)))


# --------------------------------------------------------------------------- beta schedules

def linear_betas(num_timesteps: int) -> torch.Tensor:
    """DDPM's 1e-4..0.02 over 1000 steps, scaled by 1000/T so other T keep the same ᾱ curve."""
    scale = 1000.0 / num_timesteps
    return torch.linspace(scale * 1e-4, scale * 0.02, num_timesteps, dtype=torch.float64)


def cosine_betas(num_timesteps: int, s: float = 0.008, max_beta: float = 0.999) -> torch.Tensor:
    """Improved DDPM: ᾱ(t) = cos²((t/T + s)/(1 + s)·π/2); β clipped at 0.999 (the last β would be 1)."""
    def alpha_bar(u: float) -> float:
        return math.cos((u + s) / (1 + s) * math.pi / 2) ** 2

    betas = [min(1 - alpha_bar((i + 1) / num_timesteps) / alpha_bar(i / num_timesteps), max_beta)
             for i in range(num_timesteps)]
    return torch.tensor(betas, dtype=torch.float64)


def make_betas(beta_schedule: str, num_timesteps: int) -> torch.Tensor:
    if beta_schedule == "linear":
        return linear_betas(num_timesteps)
    if beta_schedule == "cosine":
        return cosine_betas(num_timesteps)
    raise ValueError(f"unknown beta_schedule {beta_schedule!r}: expected linear or cosine")


# --------------------------------------------------------------------------- Gaussian helpers

def normal_kl(mean1, logvar1, mean2, logvar2) -> torch.Tensor:
    """KL(N(mean1, e^logvar1) ‖ N(mean2, e^logvar2)) elementwise, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2)
                  + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def discretized_gaussian_log_likelihood(x_BCHW, means_BCHW, log_scales_BCHW) -> torch.Tensor:
    """log P(x) of data in [-1, 1] quantised to 256 bins under N(mean, e^(2·log_scale)).

    The edge bins take the whole tail, as guided-diffusion's decoder. We use the exact normal
    CDF (guided-diffusion uses a tanh approximation, ~1e-3 off in the CDF), and log_ndtr for the
    tails so they do not lose precision in 1 - CDF.
    """
    centered = x_BCHW - means_BCHW
    inv_std = torch.exp(-log_scales_BCHW)
    plus_in = inv_std * (centered + 1.0 / 255.0)
    min_in = inv_std * (centered - 1.0 / 255.0)
    log_cdf_plus = torch.special.log_ndtr(plus_in)
    log_one_minus_cdf_min = torch.special.log_ndtr(-min_in)
    cdf_delta = torch.special.ndtr(plus_in) - torch.special.ndtr(min_in)
    log_delta = torch.log(cdf_delta.clamp(min=1e-12))
    return torch.where(x_BCHW < -0.999, log_cdf_plus,
                       torch.where(x_BCHW > 0.999, log_one_minus_cdf_min, log_delta))


# --------------------------------------------------------------------------- DDPM

class GaussianDiffusion:
    """Discrete-time DDPM with T steps; t = 0 is the least noisy step, T-1 the noisiest.

    Args:
        num_timesteps: T.
        beta_schedule: "linear" (DDPM/DiT) or "cosine" (improved DDPM).
        prediction: "eps" (ε-prediction) or "v" (v = α·ε - σ·x0).
        vlb_weight: weight of the learned-variance VLB term (1 reproduces DiT).
        betas: explicit β table (the samplers' respaced process); overrides the schedule.
    """

    def __init__(self, num_timesteps: int = 1000, beta_schedule: str = "linear",
                 prediction: str = "eps", vlb_weight: float = 1.0,
                 betas: torch.Tensor | None = None):
        if prediction not in ("eps", "v"):
            raise ValueError(f"unknown prediction {prediction!r}: expected eps or v")
        self.prediction = prediction
        self.vlb_weight = vlb_weight
        self.beta_schedule = beta_schedule
        betas = make_betas(beta_schedule, num_timesteps) if betas is None else betas.double()
        self.num_timesteps = len(betas)
        self.betas = betas
        alphas = 1.0 - betas
        self.alphas_cumprod = torch.cumprod(alphas, dim=0)
        self.alphas_cumprod_prev = torch.cat([betas.new_ones(1), self.alphas_cumprod[:-1]])
        self.sqrt_alphas_cumprod = self.alphas_cumprod.sqrt()
        self.sqrt_one_minus_alphas_cumprod = (1.0 - self.alphas_cumprod).sqrt()
        self.sqrt_recip_alphas_cumprod = (1.0 / self.alphas_cumprod).sqrt()
        self.sqrt_recipm1_alphas_cumprod = (1.0 / self.alphas_cumprod - 1.0).sqrt()
        # q(x_{t-1} | x_t, x0) = N(coef1·x0 + coef2·x_t, β̃_t); β̃_0 = 0, so its log is clipped
        # to β̃_1 (guided-diffusion) to stay finite: it is only the lower end of the learned range.
        self.posterior_variance = betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        pv = self.posterior_variance
        self.posterior_log_variance_clipped = torch.log(torch.cat([pv[1:2], pv[1:]])) if len(pv) > 1 \
            else torch.log(betas)
        self.posterior_mean_coef1 = betas * self.alphas_cumprod_prev.sqrt() / (1.0 - self.alphas_cumprod)
        self.posterior_mean_coef2 = (1.0 - self.alphas_cumprod_prev) * alphas.sqrt() / (1.0 - self.alphas_cumprod)
        self.log_betas = torch.log(betas)

    # ---- forward process

    def sample_t(self, batch: int, generator: torch.Generator | None = None,
                 device: torch.device | str | None = None) -> torch.Tensor:
        """Uniform integer timesteps in [0, T), long [B]."""
        return torch.randint(0, self.num_timesteps, (batch,), generator=generator, device=device)

    def q_sample(self, x0_BCHW: torch.Tensor, t_B: torch.Tensor, noise_BCHW: torch.Tensor) -> torch.Tensor:
        """x_t = sqrt(ᾱ_t)·x0 + sqrt(1 - ᾱ_t)·ε."""
        return (_extract(self.sqrt_alphas_cumprod, t_B, x0_BCHW) * x0_BCHW
                + _extract(self.sqrt_one_minus_alphas_cumprod, t_B, x0_BCHW) * noise_BCHW)

    def model_time(self, t_B: torch.Tensor) -> torch.Tensor:
        """The integer timestep as float, as DiT's timestep embedding receives it."""
        return t_B.float()

    def v_target(self, x0_BCHW, t_B, noise_BCHW) -> torch.Tensor:
        """v = sqrt(ᾱ)·ε - sqrt(1 - ᾱ)·x0."""
        return (_extract(self.sqrt_alphas_cumprod, t_B, x0_BCHW) * noise_BCHW
                - _extract(self.sqrt_one_minus_alphas_cumprod, t_B, x0_BCHW) * x0_BCHW)

    # ---- conversions between ε, v and x0

    def predict_x0_eps(self, model_out_BCHW, x_t_BCHW, t_B) -> tuple[torch.Tensor, torch.Tensor]:
        """(x0, ε) implied by the C prediction channels (ε or v) at x_t."""
        out = model_out_BCHW
        if self.prediction == "eps":
            x0 = (_extract(self.sqrt_recip_alphas_cumprod, t_B, x_t_BCHW) * x_t_BCHW
                  - _extract(self.sqrt_recipm1_alphas_cumprod, t_B, x_t_BCHW) * out)
            return x0, out
        alpha = _extract(self.sqrt_alphas_cumprod, t_B, x_t_BCHW)
        sigma = _extract(self.sqrt_one_minus_alphas_cumprod, t_B, x_t_BCHW)
        return alpha * x_t_BCHW - sigma * out, sigma * x_t_BCHW + alpha * out

    def eps_from_x0(self, x0_BCHW, x_t_BCHW, t_B) -> torch.Tensor:
        """ε consistent with x_t and a (possibly clipped) x0."""
        return ((_extract(self.sqrt_recip_alphas_cumprod, t_B, x_t_BCHW) * x_t_BCHW - x0_BCHW)
                / _extract(self.sqrt_recipm1_alphas_cumprod, t_B, x_t_BCHW))

    # ---- reverse process

    def q_posterior(self, x0_BCHW, x_t_BCHW, t_B) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and clipped log-variance of q(x_{t-1} | x_t, x0)."""
        mean = (_extract(self.posterior_mean_coef1, t_B, x_t_BCHW) * x0_BCHW
                + _extract(self.posterior_mean_coef2, t_B, x_t_BCHW) * x_t_BCHW)
        return mean, _extract(self.posterior_log_variance_clipped, t_B, x_t_BCHW).expand_as(x_t_BCHW)

    def p_mean_variance(self, model_out_BKHW, x_t_BCHW, t_B, clip_denoised: bool = False):
        """Mean, log-variance and x0 prediction of p(x_{t-1} | x_t).

        With 2C channels the log-variance interpolates between log β̃_t (v = -1) and log β_t
        (v = +1); with C channels it is the posterior's β̃_t.
        """
        C = x_t_BCHW.shape[1]
        pred_BCHW = model_out_BKHW[:, :C]
        if model_out_BKHW.shape[1] == 2 * C:
            if self.prediction != "eps":
                raise ValueError(LEARN_SIGMA_ERROR)
            frac = (model_out_BKHW[:, C:] + 1) / 2
            min_log = _extract(self.posterior_log_variance_clipped, t_B, x_t_BCHW)
            max_log = _extract(self.log_betas, t_B, x_t_BCHW)
            log_var = frac * max_log + (1 - frac) * min_log
        elif model_out_BKHW.shape[1] == C:
            log_var = _extract(self.posterior_log_variance_clipped, t_B, x_t_BCHW).expand_as(x_t_BCHW)
        else:
            raise ValueError(f"model output has {model_out_BKHW.shape[1]} channels; expected {C} or {2 * C}")
        x0, _ = self.predict_x0_eps(pred_BCHW, x_t_BCHW, t_B)
        if clip_denoised:
            x0 = x0.clamp(-1, 1)
        mean, _ = self.q_posterior(x0, x_t_BCHW, t_B)
        return mean, log_var, x0

    # ---- training loss

    def vlb_bits(self, model_out_BKHW, x0_BCHW, x_t_BCHW, t_B) -> torch.Tensor:
        """Per-sample VLB term in bits per dimension: KL(q ‖ p) for t > 0, decoder NLL at t = 0.

        Scaled by T/1000 (improved DDPM's RESCALED_MSE), so its weight against the MSE does not
        depend on T; at DiT's T = 1000 the factor is 1 and this is DiT's term exactly (DiT's plain
        MSE loss type skips the factor). The caller passes a mean-detached output (see `loss`).
        """
        mean, log_var, _ = self.p_mean_variance(model_out_BKHW, x_t_BCHW, t_B, clip_denoised=False)
        true_mean, true_log_var = self.q_posterior(x0_BCHW, x_t_BCHW, t_B)
        kl_B = mean_flat(normal_kl(true_mean, true_log_var, mean, log_var)) / math.log(2.0)
        nll_B = -mean_flat(discretized_gaussian_log_likelihood(x0_BCHW, mean, 0.5 * log_var)) / math.log(2.0)
        vlb_B = torch.where(t_B == 0, nll_B, kl_B)
        return vlb_B * (self.num_timesteps / 1000.0)

    def loss(self, model_out_BKHW, x0_BCHW, x_t_BCHW, t_B, noise_BCHW) -> dict[str, torch.Tensor]:
        """Per-sample losses ([B] each; the caller averages).

        Returns {"loss", "mse"} and "vlb" when the model predicts the variance (2C channels).
        The VLB sees the mean prediction through a stop-gradient, so it trains only the
        variance channels while the MSE trains the mean (improved DDPM's L_hybrid, as DiT).
        """
        dtype = _work_dtype(model_out_BKHW)
        out = model_out_BKHW.to(dtype)
        x0, x_t, noise = x0_BCHW.to(dtype), x_t_BCHW.to(dtype), noise_BCHW.to(dtype)
        C = x0.shape[1]
        if out.shape[1] not in (C, 2 * C):
            raise ValueError(f"model output has {out.shape[1]} channels; expected {C} or {2 * C}")
        if out.shape[1] == 2 * C and self.prediction != "eps":
            raise ValueError(LEARN_SIGMA_ERROR)
        target = noise if self.prediction == "eps" else self.v_target(x0, t_B, noise)
        mse_B = mean_flat((out[:, :C] - target) ** 2)
        terms = {"mse": mse_B, "loss": mse_B}
        if out.shape[1] == 2 * C:
            frozen = torch.cat([out[:, :C].detach(), out[:, C:]], dim=1)
            vlb_B = self.vlb_bits(frozen, x0, x_t, t_B)
            terms["vlb"] = vlb_B
            terms["loss"] = mse_B + self.vlb_weight * vlb_B
        return terms


# --------------------------------------------------------------------------- flow matching

class FlowMatching:
    """Rectified flow: x_t = (1 - t)·x0 + t·ε, t=0 data, t=1 noise, target velocity ε - x0.

    t is drawn logit-normal (SD3): t = sigmoid(N(logit_mean, logit_std²)), which puts more
    training on mid-range t where the velocity is hardest to predict.
    """

    def __init__(self, logit_mean: float = 0.0, logit_std: float = 1.0):
        self.logit_mean = logit_mean
        self.logit_std = logit_std

    def sample_t(self, batch: int, generator: torch.Generator | None = None,
                 device: torch.device | str | None = None) -> torch.Tensor:
        """Float t in (0, 1), [B]."""
        z = torch.randn(batch, generator=generator, device=device)
        return torch.sigmoid(self.logit_mean + self.logit_std * z)

    def q_sample(self, x0_BCHW, t_B, noise_BCHW) -> torch.Tensor:
        t = t_B.to(x0_BCHW.dtype).view(-1, *([1] * (x0_BCHW.ndim - 1)))
        return (1 - t) * x0_BCHW + t * noise_BCHW

    def model_time(self, t_B: torch.Tensor) -> torch.Tensor:
        """t·1000, so timestep embeddings built for DDPM's 0..999 see the same range."""
        return t_B.float() * 1000.0

    def predict_x0_eps(self, v_BCHW, x_t_BCHW, t_B) -> tuple[torch.Tensor, torch.Tensor]:
        """(x0, ε) implied by a velocity: x0 = x_t - t·v, ε = x_t + (1 - t)·v."""
        t = t_B.to(x_t_BCHW.dtype).view(-1, *([1] * (x_t_BCHW.ndim - 1)))
        return x_t_BCHW - t * v_BCHW, x_t_BCHW + (1 - t) * v_BCHW

    def loss(self, model_out_BCHW, x0_BCHW, x_t_BCHW, t_B, noise_BCHW) -> dict[str, torch.Tensor]:
        """Per-sample {"loss", "mse"} ([B]); the velocity target is ε - x0."""
        if model_out_BCHW.shape[1] != x0_BCHW.shape[1]:
            if model_out_BCHW.shape[1] == 2 * x0_BCHW.shape[1]:
                raise ValueError(LEARN_SIGMA_ERROR)
            raise ValueError(f"model output has {model_out_BCHW.shape[1]} channels; expected {x0_BCHW.shape[1]}")
        dtype = _work_dtype(model_out_BCHW)
        target = noise_BCHW.to(dtype) - x0_BCHW.to(dtype)
        mse_B = mean_flat((model_out_BCHW.to(dtype) - target) ** 2)
        return {"loss": mse_B, "mse": mse_B}


def build_objective(diffusion_cfg, learn_sigma: bool = False) -> GaussianDiffusion | FlowMatching:
    """The objective of a DiffusionConfig: ddpm -> ε-prediction, v -> v-prediction, flow.

    Pass the model's learn_sigma to fail at start-up (not at the first loss) when it is set
    with an objective that has no variance to learn.
    """
    objective = diffusion_cfg.objective
    if objective not in ("ddpm", "v", "flow"):
        raise ValueError(f"unknown diffusion objective {objective!r}: expected ddpm, v or flow")
    if learn_sigma and objective != "ddpm":
        raise ValueError(LEARN_SIGMA_ERROR)
    if objective == "flow":
        return FlowMatching(diffusion_cfg.flow_logit_mean, diffusion_cfg.flow_logit_std)
    return GaussianDiffusion(diffusion_cfg.num_timesteps, diffusion_cfg.beta_schedule,
                             prediction="eps" if objective == "ddpm" else "v",
                             vlb_weight=diffusion_cfg.vlb_weight)
