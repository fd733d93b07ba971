"""Samplers against exact predictors for Gaussian data x0 ~ N(μ, s²) per dimension.

For such data every conditional is Gaussian, so the ideal ε-, v- and velocity predictors are
closed-form and linear in x_t; a correct sampler must then reproduce μ and s up to its own
discretisation error, which we also predict in closed form where the sampler is linear.
"""
import math

import pytest
import torch

from trainer.diffusion.objectives import FlowMatching, GaussianDiffusion
from trainer.diffusion.samplers import (SAMPLERS, GuidedModel, dpm_solver_pp_sample, logsnr_timesteps, respace,
                              sample, space_timesteps, validate_sampler)

MU, S = 0.3, 0.5
SHAPE = (4096, 1, 2, 2)  # 16384 values: the mean is known to ±0.004, the std to ±0.6%


@pytest.fixture(autouse=True)
def one_thread():
    # Elementwise ops on small tensors only lose to thread hand-offs on the shared CPUs.
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(prev)


def _alpha_sigma(diffusion, t_B, like):
    acp = diffusion.alphas_cumprod.to(like.dtype)[t_B.long()].view(-1, 1, 1, 1)
    return acp.sqrt(), (1 - acp).sqrt()


def exact_eps_fn(diffusion, mu=MU, s=S):
    """E[ε | x_t] = σ(x_t - αμ) / (α²s² + σ²)."""
    def model_fn(x_t, t_B, y):
        alpha, sigma = _alpha_sigma(diffusion, t_B, x_t)
        return sigma * (x_t - alpha * mu) / (alpha**2 * s**2 + sigma**2)
    return model_fn


def exact_v_fn(diffusion, mu=MU, s=S):
    """E[v | x_t] with v = αε - σx0: Cov(v, x_t) = ασ(1 - s²), E[v] = -σμ."""
    def model_fn(x_t, t_B, y):
        alpha, sigma = _alpha_sigma(diffusion, t_B, x_t)
        return -sigma * mu + alpha * sigma * (1 - s**2) / (alpha**2 * s**2 + sigma**2) * (x_t - alpha * mu)
    return model_fn


def exact_velocity(x_t, t, mu=MU, s=S):
    """E[ε - x0 | x_t], x_t = (1-t)x0 + tε: E[u] = -μ, Cov(u, x_t) = t - (1-t)s², Var x_t = (1-t)²s² + t²."""
    return -mu + (t - (1 - t) * s**2) / ((1 - t) ** 2 * s**2 + t**2) * (x_t - (1 - t) * mu)


def exact_velocity_fn(x_t, t_B, y):
    return exact_velocity(x_t, (t_B / 1000).to(x_t.dtype).view(-1, 1, 1, 1))


def _noise(seed=0, shape=SHAPE):
    # Standardised, so the checks of mean and std measure the sampler rather than the seed.
    z = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    return (z - z.mean()) / z.std()


def _ode_exact(diffusion, z):
    """The probability-flow ODE keeps (x_t - α_t μ)/sd(x_t) fixed: the exact map from x_{T-1} = z to x0."""
    acp_T = diffusion.alphas_cumprod[-1].item()
    return MU + S * (z - math.sqrt(acp_T) * MU) / math.sqrt(acp_T * S**2 + 1 - acp_T)


def _check_stats(x, std_tol, label):
    mean, std = x.mean().item(), x.std().item()
    print(f"{label}: mean {mean:.4f} std {std:.4f}")
    assert abs(mean - MU) < 0.015, (label, mean)
    assert abs(std / S - 1) < std_tol, (label, std)


# --------------------------------------------------------------------------- exact predictors

def test_exact_predictors_match_monte_carlo():
    g = torch.Generator().manual_seed(0)
    x0 = MU + S * torch.randn(400_000, generator=g, dtype=torch.float64)
    eps = torch.randn(400_000, generator=g, dtype=torch.float64)
    # Flow: E[u | x_t] is linear in x_t, so least squares of u on x_t recovers it.
    for t in (0.1, 0.5, 0.9):
        x_t, u = (1 - t) * x0 + t * eps, eps - x0
        slope = ((x_t - x_t.mean()) * (u - u.mean())).mean() / x_t.var()
        intercept = u.mean() - slope * x_t.mean()
        probe = torch.tensor([-1.0, 0.0, 1.5], dtype=torch.float64)
        torch.testing.assert_close(intercept + slope * probe, exact_velocity(probe, t), atol=0.01, rtol=0)
    # Diffusion: the v-predictor agrees with the ε-predictor through the exact conversions.
    for prediction, fn in (("eps", exact_eps_fn), ("v", exact_v_fn)):
        d = GaussianDiffusion(1000, prediction=prediction)
        t = torch.tensor([10, 300, 900])
        x_t = torch.randn(3, 1, 2, 2, generator=g, dtype=torch.float64)
        x0_hat, _ = d.predict_x0_eps(fn(d)(x_t, t.double(), None), x_t, t)
        alpha, sigma = _alpha_sigma(d, t, x_t)
        torch.testing.assert_close(x0_hat, MU + alpha * S**2 / (alpha**2 * S**2 + sigma**2) * (x_t - alpha * MU))


# --------------------------------------------------------------------------- timesteps

def test_space_timesteps_and_respacing():
    ts = space_timesteps(1000, 250)
    assert len(ts) == 250 and ts[0] == 0 and ts[-1] == 999 and (ts[1:] > ts[:-1]).all()
    assert ts[1] == 4 and ts[125] == round(125 * 999 / 249)
    d = GaussianDiffusion(1000)
    spaced = respace(d, ts)
    torch.testing.assert_close(spaced.alphas_cumprod, d.alphas_cumprod[ts], rtol=1e-12, atol=0)
    assert spaced.betas[0].item() == pytest.approx(d.betas[0].item(), rel=1e-9)
    for steps in (1, 2, 10, 20, 500):
        for sched in ("linear", "cosine"):
            idx = logsnr_timesteps(GaussianDiffusion(1000, sched), steps)
            assert len(idx) == steps and idx[0] == 999 and all(a > b for a, b in zip(idx, idx[1:]))
            assert steps == 1 or idx[-1] == 0
    # Uniform in λ where the table allows (it is coarse in λ near t=0): the first 15 of 19 gaps.
    acp = d.alphas_cumprod[logsnr_timesteps(d, 20)]
    h = torch.diff(0.5 * torch.log(acp / (1 - acp)))[:15]
    assert h.min() > 0.95 * h.mean() and h.max() < 1.05 * h.mean()


# --------------------------------------------------------------------------- diffusion samplers

def _ddpm_predicted_std(diffusion, steps, log_var_fn):
    """Std of ancestral sampling with the exact mean, from its linear-Gaussian recursion.

    With x = αμ + δ, the posterior mean is α'μ + A·δ, A = c1·αs²/(α²s² + σ²) + c2, so
    Var(δ') = A²·Var(δ) + var'; the last step adds no noise.
    """
    acp = diffusion.alphas_cumprod[space_timesteps(diffusion.num_timesteps, steps)].tolist()
    var = 1.0
    for i in range(steps - 1, -1, -1):
        a, a_prev = acp[i], (acp[i - 1] if i > 0 else 1.0)
        beta = 1 - a / a_prev
        c1, c2 = beta * math.sqrt(a_prev) / (1 - a), (1 - a_prev) * math.sqrt(1 - beta) / (1 - a)
        gain = c1 * math.sqrt(a) * S**2 / (a * S**2 + 1 - a) + c2
        post_var = beta * (1 - a_prev) / (1 - a)
        var = gain**2 * var + (log_var_fn(beta, post_var) if i > 0 else 0.0)
    return math.sqrt(var)


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_ddpm_reproduces_gaussian(prediction):
    d = GaussianDiffusion(1000, prediction=prediction)
    fn = exact_eps_fn(d) if prediction == "eps" else exact_v_fn(d)
    x, nfe = sample(fn, d, SHAPE, None, "ddpm", 250, generator=torch.Generator().manual_seed(0),
                    noise=_noise(0), clip_denoised=False)
    assert nfe == 250
    _check_stats(x, 0.04, f"ddpm-250 {prediction}")
    # Its ~3.5% std deficit is the fixed posterior variance β̃ at 250 steps, as predicted:
    predicted = _ddpm_predicted_std(d, 250, lambda beta, post: post)
    assert x.std().item() == pytest.approx(predicted, rel=0.015)


def test_ddpm_learned_variance_interpolates():
    d = GaussianDiffusion(1000)
    eps_fn = exact_eps_fn(d)
    stds = {}
    for v in (1.0, -1.0):
        def model_fn(x_t, t_B, y, v=v):
            return torch.cat([eps_fn(x_t, t_B, y), torch.full_like(x_t, v)], 1)
        x, _ = sample(model_fn, d, SHAPE, None, "ddpm", 50, generator=torch.Generator().manual_seed(1),
                      noise=_noise(1), clip_denoised=False)
        stds[v] = x.std().item()
        predicted = _ddpm_predicted_std(d, 50, (lambda beta, post: beta) if v > 0 else (lambda beta, post: post))
        print(f"ddpm-50 learned v={v:+.0f}: std {stds[v]:.4f} (predicted {predicted:.4f})")
        assert stds[v] == pytest.approx(predicted, rel=0.015)
    assert stds[1.0] > stds[-1.0] * 1.05  # Σ = β adds more noise than Σ = β̃


def _ddim_exact_map(diffusion, steps, z):
    """DDIM with the exact ε̂ is linear: δ' = δ·(α'αs² + σ'σ)/(α²s² + σ²) per step."""
    acp = [1.0] + diffusion.alphas_cumprod[space_timesteps(diffusion.num_timesteps, steps)].tolist()
    gain = 1.0
    for a_prev, a in zip(acp[:-1], acp[1:]):
        gain *= (math.sqrt(a_prev * a) * S**2 + math.sqrt((1 - a_prev) * (1 - a))) / (a * S**2 + 1 - a)
    return MU + gain * (z - math.sqrt(acp[-1]) * MU)


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_ddim_reproduces_gaussian(prediction):
    d = GaussianDiffusion(1000, prediction=prediction)
    fn = exact_eps_fn(d) if prediction == "eps" else exact_v_fn(d)
    z = _noise(2)
    x, nfe = sample(fn, d, SHAPE, None, "ddim", 50, noise=z, clip_denoised=False)
    assert nfe == 50
    # DDIM is first order: at 50 steps it shrinks the std by ~5% on this data, exactly as its
    # closed-form linear map says; 250 steps get within 1.5%.
    _check_stats(x, 0.06, f"ddim-50 {prediction}")
    torch.testing.assert_close(x, _ddim_exact_map(d, 50, z), atol=2e-5, rtol=0)
    x250, _ = sample(fn, d, SHAPE, None, "ddim", 250, noise=z, clip_denoised=False)
    assert (x250 - _ode_exact(d, z)).abs().mean() < (x - _ode_exact(d, z)).abs().mean() / 4


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_dpm_solver_pp_reproduces_gaussian(schedule, prediction):
    d = GaussianDiffusion(1000, schedule, prediction=prediction)
    fn = exact_eps_fn(d) if prediction == "eps" else exact_v_fn(d)
    z = _noise(3)
    errors = {}
    for steps in (10, 20, 50):
        x, nfe = sample(fn, d, SHAPE, None, "dpm_solver_pp", steps, noise=z, clip_denoised=False)
        assert nfe == steps
        if steps < 50:
            _check_stats(x, 0.04, f"dpm_solver_pp-{steps} {schedule} {prediction}")
        errors[steps] = (x - _ode_exact(d, z)).abs().mean().item()
    print(f"dpm_solver_pp {schedule} {prediction} mean |x - exact ODE map|: {errors}")
    # Second order: 2.5x the steps cuts the error ~6x (first order would give 2.5x), and 20 NFE
    # beat DDIM's 50.
    assert errors[50] < errors[20] / 4
    x_ddim, _ = sample(fn, d, SHAPE, None, "ddim", 50, noise=z, clip_denoised=False)
    assert errors[20] < (x_ddim - _ode_exact(d, z)).abs().mean().item()


def test_dpm_solver_pp_is_second_order_on_uneven_steps():
    # Time-uniform steps are far from uniform in λ, so r = h_prev/h is far from 1 and a wrong
    # multistep coefficient falls back to first order (error ratio ~2 per doubling instead of ~4).
    d = GaussianDiffusion(1000)
    z = _noise(9, (256, 1, 2, 2))
    model = lambda: GuidedModel(exact_eps_fn(d), None)
    err = {}
    for n in (200, 400):
        x = dpm_solver_pp_sample(model(), d, z, n, clip_denoised=False, spacing="time_uniform")
        err[n] = (x - _ode_exact(d, z)).abs().mean()
    assert err[400] < err[200] / 3.5
    # Without the final denoising all 20 NFE are solver steps ending at t=0 (σ_0 = 0.01 left).
    model_20 = model()
    x = dpm_solver_pp_sample(model_20, d, z, 20, clip_denoised=False, denoise_to_zero=False)
    assert model_20.nfe == 20 and (x - _ode_exact(d, z)).abs().mean() < 0.012


def test_clip_denoised_keeps_samples_in_range():
    d = GaussianDiffusion(1000)
    fn = exact_eps_fn(d)
    for sampler in ("ddpm", "ddim", "dpm_solver_pp"):
        g = torch.Generator().manual_seed(4)
        x, _ = sample(fn, d, (512, 1, 2, 2), None, sampler, 20, generator=g)
        assert x.min() >= -1 and x.max() <= 1
        x, _ = sample(fn, d, (512, 1, 2, 2), None, sampler, 20, generator=g, clip_denoised=False)
        assert x.max() > 1  # N(0.3, 0.5²) has 8% of its mass above 1


# --------------------------------------------------------------------------- flow samplers

@pytest.mark.parametrize("sampler,steps,nfe,err_tol", [("euler", 50, 50, 0.02), ("euler", 100, 100, 0.01),
                                                       ("heun", 10, 19, 0.015), ("heun", 20, 39, 0.004)])
def test_flow_samplers_reproduce_gaussian(sampler, steps, nfe, err_tol):
    z = _noise(5)
    x, got_nfe = sample(exact_velocity_fn, FlowMatching(), SHAPE, None, sampler, steps, noise=z)
    assert got_nfe == nfe
    _check_stats(x, 0.04, f"{sampler}-{steps}")
    # The rectified-flow ODE of Gaussian data is the affine map x0 = μ + s·ε.
    assert (x - (MU + S * z)).abs().mean() < err_tol


def test_flow_euler_is_exact_for_a_constant_velocity_and_heun_for_a_linear_one():
    z = _noise(6, (8, 2, 2, 2))
    x, _ = sample(lambda x_t, t_B, y: torch.full_like(x_t, 0.7), FlowMatching(), z.shape, None, "euler", 3, noise=z)
    torch.testing.assert_close(x, z - 0.7)
    # v = t: x(0) = x(1) - 1/2, and the trapezoid rule is exact for a velocity linear in t.
    fn = lambda x_t, t_B, y: (t_B / 1000).view(-1, 1, 1, 1) * torch.ones_like(x_t)
    x, nfe = sample(fn, FlowMatching(), z.shape, None, "heun", 4, noise=z)
    assert nfe == 7
    # The last step is Euler from t=1/4 to 0 (velocity 1/4 there), the others exact.
    torch.testing.assert_close(x, z - (0.5 - 1 / 32) - 1 / 16)


# --------------------------------------------------------------------------- guidance, NFE, errors

def _labelled_model(calls):
    """Output on 2C channels depends on x, t and the label in known ways."""
    def model_fn(x_t, t_B, y_B):
        calls.append((x_t.shape[0], y_B.clone()))
        scale_B = torch.where(y_B == 10, -0.5, y_B.float() + 1.0).view(-1, 1, 1, 1)
        ch = torch.arange(2 * x_t.shape[1], dtype=x_t.dtype).view(1, -1, 1, 1)
        return torch.cat([x_t, x_t], 1) * scale_B + ch * scale_B + t_B.view(-1, 1, 1, 1) * 1e-3
    return model_fn


def test_guided_output_on_all_channels():
    calls = []
    fn = _labelled_model(calls)
    x = _noise(7, (3, 2, 2, 2))
    y = torch.tensor([0, 2, 5])
    t = torch.full((3,), 400.0)
    guided = GuidedModel(fn, y, cfg_scale=4.0, null_label=10)
    out = guided(x, t)
    cond = fn(x, t, y)
    uncond = fn(x, t, torch.full_like(y, 10))
    assert out.shape == (3, 4, 2, 2)
    torch.testing.assert_close(out, uncond + 4.0 * (cond - uncond))  # all 4 = 2C channels
    assert calls[0][0] == 6 and calls[0][1].tolist() == [0, 2, 5, 10, 10, 10]  # one call of 2B
    assert guided.nfe == 1
    torch.testing.assert_close(GuidedModel(fn, y)(x, t), cond)


@pytest.mark.parametrize("sampler,objective,steps,nfe", [
    ("ddpm", GaussianDiffusion(100), 7, 7), ("ddim", GaussianDiffusion(100), 6, 6),
    ("dpm_solver_pp", GaussianDiffusion(100), 6, 6),
    ("euler", FlowMatching(), 5, 5), ("heun", FlowMatching(), 5, 9)])
@pytest.mark.parametrize("cfg_scale", [1.0, 3.0])
def test_nfe_counts_batched_guidance(sampler, objective, steps, nfe, cfg_scale):
    calls = []
    C = 2
    base = _labelled_model(calls)
    model_fn = lambda x_t, t_B, y_B: base(x_t, t_B, y_B)[:, :C]
    y = torch.tensor([1, 3])
    _, got = sample(model_fn, objective, (2, C, 2, 2), y, sampler, steps, cfg_scale=cfg_scale, null_label=10,
                    generator=torch.Generator().manual_seed(0))
    assert got == nfe and len(calls) == nfe
    rows = 4 if cfg_scale != 1.0 else 2
    assert all(b == rows for b, _ in calls)
    assert calls[0][1].tolist() == ([1, 3, 10, 10] if cfg_scale != 1.0 else [1, 3])


def test_guided_flow_sample_end_to_end():
    # cond velocity 0.7, uncond 0.2 → guided 0.2 + 3·0.5 = 1.7; x0 = x1 - 1.7 exactly with Euler.
    def model_fn(x_t, t_B, y_B):
        return torch.where((y_B == 10).view(-1, 1, 1, 1), 0.2, 0.7) * torch.ones_like(x_t)
    z = _noise(8, (4, 3, 2, 2))
    x, nfe = sample(model_fn, FlowMatching(), z.shape, torch.arange(4), "euler", 4, cfg_scale=3.0,
                    null_label=10, noise=z)
    torch.testing.assert_close(x, z - 1.7)
    assert nfe == 4


def test_sampler_objective_mismatch_and_bad_arguments():
    d, f = GaussianDiffusion(100), FlowMatching()
    assert set(SAMPLERS) == {"ddpm", "ddim", "dpm_solver_pp", "euler", "heun"}
    for sampler in ("euler", "heun"):
        with pytest.raises(ValueError, match="flow"):
            sample(exact_velocity_fn, d, (2, 1, 2, 2), None, sampler, 4)
    for sampler in ("ddpm", "ddim", "dpm_solver_pp"):
        with pytest.raises(ValueError, match="diffusion"):
            sample(exact_velocity_fn, f, (2, 1, 2, 2), None, sampler, 4)
    with pytest.raises(ValueError, match="unknown sampler"):
        validate_sampler(d, "plms")
    with pytest.raises(ValueError, match="null_label"):
        sample(exact_velocity_fn, f, (2, 1, 2, 2), torch.tensor([0, 1]), "euler", 4, cfg_scale=2.0)
    with pytest.raises(ValueError, match="steps"):
        sample(exact_eps_fn(d), d, (2, 1, 2, 2), None, "ddim", 101)


def test_progress_bar(capsys):
    sample(exact_velocity_fn, FlowMatching(), (2, 1, 2, 2), None, "heun", 3, progress=True)
    assert "heun" in capsys.readouterr().err
