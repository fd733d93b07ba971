import math

import pytest
import torch
from torch.distributions import Normal, kl_divergence

from trainer.diffusion.config import DiffusionConfig
from trainer.diffusion.objectives import FlowMatching, GaussianDiffusion, build_objective

LOG2 = math.log(2.0)


# --------------------------------------------------------------------------- schedules

def test_linear_schedule_tables():
    d = GaussianDiffusion(1000, "linear")
    assert d.betas.dtype == torch.float64
    assert d.betas[0].item() == pytest.approx(1e-4) and d.betas[-1].item() == pytest.approx(0.02)
    assert GaussianDiffusion(500, "linear").betas[-1].item() == pytest.approx(0.04)  # scaled by 1000/T
    assert (d.alphas_cumprod[1:] < d.alphas_cumprod[:-1]).all()
    alphas = 1 - d.betas
    for t in (1, 7, 500, 999):
        acp_t = torch.prod(alphas[: t + 1]).item()
        acp_prev = torch.prod(alphas[:t]).item()
        beta_t = d.betas[t].item()
        assert d.alphas_cumprod[t].item() == pytest.approx(acp_t, rel=1e-12)
        assert d.posterior_variance[t].item() == pytest.approx(beta_t * (1 - acp_prev) / (1 - acp_t), rel=1e-12)
        assert d.posterior_mean_coef1[t].item() == pytest.approx(beta_t * math.sqrt(acp_prev) / (1 - acp_t))
        assert d.posterior_mean_coef2[t].item() == pytest.approx((1 - acp_prev) * math.sqrt(1 - beta_t) / (1 - acp_t))
    assert d.posterior_variance[0].item() == 0.0
    assert d.posterior_log_variance_clipped[0] == d.posterior_log_variance_clipped[1]  # log 0 clipped


def test_cosine_schedule_ends_at_pure_noise():
    d = GaussianDiffusion(1000, "cosine")
    assert d.alphas_cumprod[-1].item() < 1e-6
    assert (d.alphas_cumprod[1:] < d.alphas_cumprod[:-1]).all()
    assert d.betas.max().item() == pytest.approx(0.999)
    # ᾱ_t tracks cos²((t/T + s)/(1 + s)·π/2) / ᾱ(0) away from the clipped end
    f = lambda u: math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2
    assert d.alphas_cumprod[499].item() == pytest.approx(f(0.5) / f(0.0), rel=1e-9)


# --------------------------------------------------------------------------- forward process

def test_q_sample_statistics():
    d = GaussianDiffusion(1000)
    g = torch.Generator().manual_seed(0)
    t = torch.full((20000,), 300)
    x0 = torch.full((20000, 1, 1, 1), 0.7)
    x_t = d.q_sample(x0, t, torch.randn(x0.shape, generator=g))
    acp = d.alphas_cumprod[300].item()
    assert x_t.mean().item() == pytest.approx(math.sqrt(acp) * 0.7, abs=0.015)
    assert x_t.std().item() == pytest.approx(math.sqrt(1 - acp), rel=0.02)
    assert d.model_time(torch.tensor([0, 999])).tolist() == [0.0, 999.0]
    ts = d.sample_t(5000, generator=g)
    assert ts.dtype == torch.long and ts.min() >= 0 and ts.max() <= 999 and ts.float().std() > 250


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_eps_v_x0_round_trip_float64(prediction):
    d = GaussianDiffusion(1000, "linear", prediction=prediction)
    g = torch.Generator().manual_seed(1)
    x0 = torch.rand(6, 2, 3, 3, generator=g, dtype=torch.float64) * 2 - 1
    eps = torch.randn(6, 2, 3, 3, generator=g, dtype=torch.float64)
    t = torch.tensor([0, 1, 10, 400, 998, 999])
    x_t = d.q_sample(x0, t, eps)
    out = eps if prediction == "eps" else d.v_target(x0, t, eps)
    x0_hat, eps_hat = d.predict_x0_eps(out, x_t, t)
    torch.testing.assert_close(x0_hat, x0, rtol=0, atol=1e-9)
    torch.testing.assert_close(eps_hat, eps, rtol=0, atol=1e-12)
    torch.testing.assert_close(d.eps_from_x0(x0, x_t, t), eps, rtol=0, atol=1e-9)


# --------------------------------------------------------------------------- losses

def _batch(d, B=4, C=2, t=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.rand(B, C, 4, 4, generator=g) * 2 - 1
    noise = torch.randn(x0.shape, generator=g)
    t = d.sample_t(B, generator=g) if t is None else t
    return x0, noise, t, d.q_sample(x0, t, noise)


def test_eps_loss_without_learned_sigma():
    d = GaussianDiffusion(1000)
    x0, noise, t, x_t = _batch(d)
    terms = d.loss(noise + 0.1, x0, x_t, t, noise)
    assert set(terms) == {"loss", "mse"} and terms["loss"].shape == (4,)
    torch.testing.assert_close(terms["mse"], torch.full((4,), 0.01))


def test_v_loss_target():
    d = GaussianDiffusion(1000, prediction="v")
    x0, noise, t, x_t = _batch(d)
    v = d.v_target(x0, t, noise)
    alpha = d.sqrt_alphas_cumprod[t].float().view(-1, 1, 1, 1)
    torch.testing.assert_close(v, alpha * noise - (1 - alpha**2).sqrt() * x0)
    assert d.loss(v, x0, x_t, t, noise)["loss"].abs().max() < 1e-10


def test_learned_sigma_vlb_nonneg_and_stop_grad():
    d = GaussianDiffusion(1000, vlb_weight=0.5)
    x0, noise, t, x_t = _batch(d, B=8, t=torch.tensor([0, 1, 2, 50, 300, 600, 998, 999]))
    g = torch.Generator().manual_seed(3)
    out = torch.cat([noise + 0.3 * torch.randn(x0.shape, generator=g),
                     torch.rand(x0.shape, generator=g) * 2 - 1], 1).requires_grad_(True)
    terms = d.loss(out, x0, x_t, t, noise)
    assert set(terms) == {"loss", "mse", "vlb"} and terms["vlb"].shape == (8,)
    assert (terms["vlb"] >= 0).all()
    torch.testing.assert_close(terms["loss"], terms["mse"] + 0.5 * terms["vlb"])
    (grad,) = torch.autograd.grad(terms["vlb"].sum(), out)
    assert grad[:, :2].abs().max() == 0  # the mean channels get no VLB gradient
    assert grad[:, 2:].abs().min() > 0
    (grad,) = torch.autograd.grad(terms["mse"].sum(), out)
    assert grad[:, 2:].abs().max() == 0 and grad[:, :2].abs().max() > 0


@pytest.mark.parametrize("num_timesteps", [1000, 500])
def test_vlb_equals_hand_computed_kl(num_timesteps):
    d = GaussianDiffusion(num_timesteps)
    t, x0, x_t, eps_pred, v = 137, 0.4, -0.3, 0.25, 0.2
    betas = d.betas.tolist()
    acp = math.prod(1 - b for b in betas[: t + 1])
    acp_prev = acp / (1 - betas[t])
    beta = betas[t]
    post_var = beta * (1 - acp_prev) / (1 - acp)
    coef1 = beta * math.sqrt(acp_prev) / (1 - acp)
    coef2 = (1 - acp_prev) * math.sqrt(1 - beta) / (1 - acp)
    x0_pred = (x_t - math.sqrt(1 - acp) * eps_pred) / math.sqrt(acp)
    frac = (v + 1) / 2
    model_var = math.exp(frac * math.log(beta) + (1 - frac) * math.log(post_var))
    q = Normal(torch.tensor(coef1 * x0 + coef2 * x_t, dtype=torch.float64), math.sqrt(post_var))
    p = Normal(torch.tensor(coef1 * x0_pred + coef2 * x_t, dtype=torch.float64), math.sqrt(model_var))
    expected = kl_divergence(q, p).item() / LOG2 * num_timesteps / 1000
    f64 = lambda val: torch.tensor([[[[val]]]], dtype=torch.float64)
    out = torch.cat([f64(eps_pred), f64(v)], 1)
    got = d.loss(out, f64(x0), f64(x_t), torch.tensor([t]), f64(0.0))["vlb"].item()
    assert got == pytest.approx(expected, rel=1e-9)
    assert got > 0


@pytest.mark.parametrize("x0", [0.3, -1.0, 1.0])
def test_vlb_at_t0_is_decoder_nll(x0):
    d = GaussianDiffusion(1000)
    x_t, eps_pred, v = x0 + 0.01, 0.5, -0.4
    acp = d.alphas_cumprod[0].item()
    beta, clipped_log_var = d.betas[0].item(), d.posterior_log_variance_clipped[0].item()
    x0_pred = (x_t - math.sqrt(1 - acp) * eps_pred) / math.sqrt(acp)
    mean = d.posterior_mean_coef1[0].item() * x0_pred + d.posterior_mean_coef2[0].item() * x_t
    assert mean == pytest.approx(x0_pred)  # at t=0 the posterior mean is the x0 prediction
    frac = (v + 1) / 2
    std = math.exp(0.5 * (frac * math.log(beta) + (1 - frac) * clipped_log_var))
    dist = Normal(torch.tensor(mean, dtype=torch.float64), std)
    hi, lo = torch.tensor(x0 + 1 / 255, dtype=torch.float64), torch.tensor(x0 - 1 / 255, dtype=torch.float64)
    if x0 <= -1:
        prob = dist.cdf(hi)
    elif x0 >= 1:
        prob = 1 - dist.cdf(lo)
    else:
        prob = dist.cdf(hi) - dist.cdf(lo)
    expected = -math.log(prob.item()) / LOG2
    f64 = lambda val: torch.tensor([[[[val]]]], dtype=torch.float64)
    out = torch.cat([f64(eps_pred), f64(v)], 1)
    got = d.loss(out, f64(x0), f64(x_t), torch.tensor([0]), f64(0.0))["vlb"].item()
    assert got == pytest.approx(expected, rel=1e-6)


def test_learn_sigma_only_with_eps():
    v_diff = GaussianDiffusion(1000, prediction="v")
    x0, noise, t, x_t = _batch(v_diff)
    with pytest.raises(ValueError, match="learn_sigma"):
        v_diff.loss(torch.cat([noise, noise], 1), x0, x_t, t, noise)
    flow = FlowMatching()
    with pytest.raises(ValueError, match="learn_sigma"):
        flow.loss(torch.cat([noise, noise], 1), x0, x_t, t.float() / 1000, noise)
    for objective in ("v", "flow"):
        with pytest.raises(ValueError, match="learn_sigma"):
            build_objective(DiffusionConfig(objective=objective), learn_sigma=True)
    with pytest.raises(ValueError, match="channels"):
        GaussianDiffusion(1000).loss(torch.cat([noise] * 3, 1), x0, x_t, t, noise)


def test_build_objective():
    d = build_objective(DiffusionConfig(objective="ddpm", num_timesteps=100, beta_schedule="cosine",
                                        vlb_weight=0.3), learn_sigma=True)
    assert isinstance(d, GaussianDiffusion) and d.prediction == "eps" and d.num_timesteps == 100
    assert d.vlb_weight == 0.3 and d.beta_schedule == "cosine"
    assert build_objective(DiffusionConfig(objective="v")).prediction == "v"
    f = build_objective(DiffusionConfig(objective="flow", flow_logit_mean=0.5, flow_logit_std=2.0))
    assert isinstance(f, FlowMatching) and (f.logit_mean, f.logit_std) == (0.5, 2.0)
    with pytest.raises(ValueError):
        build_objective(DiffusionConfig(objective="edm"))


# --------------------------------------------------------------------------- flow matching

def test_flow_matching_objective():
    f = FlowMatching(logit_mean=0.5, logit_std=0.8)
    g = torch.Generator().manual_seed(0)
    t = f.sample_t(20000, generator=g)
    assert ((t > 0) & (t < 1)).all()
    logit = torch.log(t / (1 - t))
    assert logit.mean().item() == pytest.approx(0.5, abs=0.03)
    assert logit.std().item() == pytest.approx(0.8, rel=0.03)
    x0, noise = torch.rand(3, 2, 4, 4, generator=g), torch.randn(3, 2, 4, 4, generator=g)
    t = torch.tensor([0.0, 0.25, 1.0])
    x_t = f.q_sample(x0, t, noise)
    torch.testing.assert_close(x_t[0], x0[0])
    torch.testing.assert_close(x_t[2], noise[2])
    torch.testing.assert_close(x_t[1], 0.75 * x0[1] + 0.25 * noise[1])
    assert f.model_time(t).tolist() == [0.0, 250.0, 1000.0]
    terms = f.loss(noise - x0, x0, x_t, t, noise)
    assert terms["loss"].shape == (3,) and terms["loss"].abs().max() == 0
    torch.testing.assert_close(f.loss(noise - x0 + 0.2, x0, x_t, t, noise)["mse"], torch.full((3,), 0.04))
    x0_hat, eps_hat = f.predict_x0_eps(noise - x0, x_t, t)
    torch.testing.assert_close(x0_hat, x0)
    torch.testing.assert_close(eps_hat, noise)
