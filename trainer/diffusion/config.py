"""The diffusion section of a DiT recipe (model.family dit): objective, noise schedule, sampler,
EMA and evaluation, and the rules between them and the model. No torch (see models/config.py)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from models.config import ConfigSection, bounded, require

DIFFUSION_SAMPLERS = ("ddpm", "ddim", "dpm_solver_pp")  # ε / v objectives
FLOW_SAMPLERS = ("euler", "heun")  # the flow objective


@dataclass
class DiffusionConfig(ConfigSection):
    """Objective and sampling of DiT recipes (model.family dit)."""
    # ddpm: ε-prediction (+ the learned-range variance VLB term with model.learn_sigma)
    # v: v-prediction; flow: rectified flow / flow matching (velocity noise - x0)
    objective: Literal["ddpm", "v", "flow"] = "ddpm"
    num_timesteps: int = bounded(1000, gt=0)
    beta_schedule: Literal["linear", "cosine"] = "linear"
    vlb_weight: float = bounded(1.0, ge=0)  # weight of the VLB term (it is a per-pixel mean, as in DiT)
    flow_logit_mean: float = 0.0  # logit-normal timestep sampling of the flow objective
    flow_logit_std: float = bounded(1.0, gt=0)
    sampler: Literal[DIFFUSION_SAMPLERS + FLOW_SAMPLERS] = "ddpm"  # ddpm | ddim | dpm_solver_pp; euler | heun (flow)
    sample_steps: int = bounded(250, gt=0)  # steps of the sampler (NFE = steps; heun 2 per step but the last)
    cfg_scale: float = bounded(1.5, ge=0)  # classifier-free guidance scale (1: none), over all output channels
    ema_decay: float = bounded(0.999, ge=0, lt=1)  # EMA of the weights, used for sampling
    num_samples: int = bounded(200, gt=0)  # class-conditional samples drawn at evaluation (over all ranks)


def check_diffusion(d: DiffusionConfig, learn_sigma: bool) -> None:
    """The sampler against the objective, the learned variance, the sampler's step count."""
    samplers = FLOW_SAMPLERS if d.objective == "flow" else DIFFUSION_SAMPLERS
    require(d.sampler in samplers, f"diffusion.sampler: {d.sampler!r} does not sample diffusion.objective="
                                   f"{d.objective}; use one of {', '.join(samplers)}")
    require(not learn_sigma or d.objective == "ddpm",
            f"model.learn_sigma: the learned variance needs diffusion.objective=ddpm, got {d.objective}")
    require(d.sample_steps <= d.num_timesteps or d.objective == "flow",
            f"diffusion.sample_steps={d.sample_steps} exceeds diffusion.num_timesteps={d.num_timesteps}")
