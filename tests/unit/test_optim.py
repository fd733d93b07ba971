import math

import pytest
import torch

from trainer.config import OptimConfig
from trainer.optim import build_optimizer, build_scheduler, lr_factor


def test_no_decay_groups_hold_vectors_only():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    opt = build_optimizer(model, OptimConfig(weight_decay=0.1))
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and all(p.ndim == 2 for p in decay["params"])
    assert no_decay["weight_decay"] == 0.0 and len(no_decay["params"]) == 3  # bias, ln weight, ln bias


def test_warmup_then_cosine_to_floor():
    cfg = OptimConfig(schedule="cosine", warmup_steps=10, min_lr_ratio=0.1)
    assert lr_factor(0, 100, cfg) == pytest.approx(0.1)
    assert lr_factor(9, 100, cfg) == pytest.approx(1.0)
    mid = 10 + 45
    assert lr_factor(mid, 100, cfg) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_factor(100, 100, cfg) == pytest.approx(0.1)


def test_wsd_is_flat_then_decays_linearly():
    cfg = OptimConfig(schedule="wsd", warmup_steps=10, decay_fraction=0.2, min_lr_ratio=0.0)
    assert [lr_factor(s, 100, cfg) for s in (10, 50, 79)] == [1.0, 1.0, 1.0]
    assert lr_factor(90, 100, cfg) == pytest.approx(0.5)
    assert lr_factor(100, 100, cfg) == pytest.approx(0.0)


def test_scheduler_drives_optimizer_lr():
    param = torch.nn.Parameter(torch.zeros(2, 2))
    opt = build_optimizer(torch.nn.ParameterList([param]), OptimConfig(lr=1.0, warmup_steps=4, schedule="constant"))
    sched = build_scheduler(opt, 10, OptimConfig(lr=1.0, warmup_steps=4, schedule="constant"))
    seen = []
    for _ in range(5):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen == pytest.approx([0.25, 0.5, 0.75, 1.0, 1.0])


def test_optim_implementation_picks_adamw_kernels_and_fused_matches_foreach():
    from trainer.optim import kernel_choice

    cpu = [torch.nn.Parameter(torch.zeros(2))]
    assert kernel_choice("auto", cpu) == {}  # CPU runs keep torch's default, bitwise as before
    assert kernel_choice("foreach", cpu) == {"foreach": True}
    assert kernel_choice("for_loop", cpu) == {"foreach": False}
    meta_cuda = [torch.nn.Parameter(torch.empty(2, device="meta"))]
    assert kernel_choice("auto", meta_cuda) == {}
    results = {}
    for impl in ("fused", "foreach", "for_loop"):
        torch.manual_seed(0)
        model = torch.nn.Linear(8, 4)
        opt = build_optimizer(model, OptimConfig(lr=0.1, weight_decay=0.1, implementation=impl))
        assert opt.param_groups[0]["fused"] is (True if impl == "fused" else None)
        for _ in range(3):
            model(torch.randn(5, 8)).square().sum().backward()
            opt.step()
            opt.zero_grad()
        results[impl] = model.weight.detach().clone()
    torch.testing.assert_close(results["fused"], results["foreach"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(results["for_loop"], results["foreach"], rtol=1e-5, atol=1e-6)
