"""Non-finite guard and routing-collapse warning (trainer/guards.py), through the real loop on one process."""
import json
import math
import os

import pytest
import torch

from trainer.recipe import load_config
from trainer.guards import CollapseMonitor, NonFiniteError, NonFiniteGuard, clip_with_norm

RECIPE = "recipes/llm/pretrain_tiny.yaml"
SMALL = ["data.max_bytes=200000", "data.seq_len=32", "model.d_model=64", "model.num_layers=2",
         "moe.expert_ffn_dim=64", "logging.wandb=false", "logging.progress_bar=false", "train.log_every=1",
         "eval.every=0", "eval.batches=1", "optim.warmup_steps=2", "train.micro_batch_size=4",
         "checkpoint.enabled=false", "logging.heatmap_every=0"]


def _trainer(tmp_path, *overrides):
    from trainer.loop import Trainer

    torch.set_num_threads(1)
    return Trainer(load_config(RECIPE, SMALL + list(overrides)), str(tmp_path))


def _records(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return {r["step"]: r for r in map(json.loads, f) if "loss" in r}


def _poison_grad_at(trainer, name, steps):
    """NaN into the gradient of parameter `name` at the given steps (the loss stays finite)."""
    param = dict(trainer.model.named_parameters())[name]
    param.register_hook(lambda g: g * math.nan if trainer.step + 1 in steps else g)


def test_a_nonfinite_step_is_skipped_and_training_goes_on(tmp_path, capsys):
    trainer = _trainer(tmp_path, "train.steps=5", "train.max_nonfinite_steps=1")
    names = [n for n, _ in trainer.model.named_parameters()]
    _poison_grad_at(trainer, names[len(names) // 2], {3})
    before = {}
    real_check = trainer.guard.check

    def check_recording(step, loss, grad_norm, model):
        before[step] = {n: p.detach().clone() for n, p in model.named_parameters()}
        return real_check(step, loss, grad_norm, model)

    trainer.guard.check = check_recording
    trainer.run()
    records = _records(str(tmp_path))
    assert sorted(records) == [1, 2, 3, 4, 5]
    assert records[3]["grad_norm"] == "nan" and records[3]["nonfinite_skipped"] == 1
    assert all("nonfinite_skipped" not in records[s] for s in (1, 2, 4, 5))
    assert all(math.isfinite(records[s]["loss"]) for s in records)
    # Step 3 changed nothing: step 4 starts from the weights step 3 started from.
    assert all(torch.equal(before[3][n], before[4][n]) for n in names)
    assert not all(torch.equal(before[4][n], before[5][n]) for n in names)  # step 4 trained
    # The scheduler and AdamW's step counts skipped it too: 4 optimizer steps in 5 training steps.
    assert trainer.scheduler.last_epoch == 4
    assert {int(s["step"]) for s in trainer.optimizer.state.values()} == {4}
    out = capsys.readouterr().out
    assert "warning: step 3: loss " in out and "optimizer step skipped (1 in a row" in out


def test_too_many_in_a_row_stop_naming_step_and_first_parameter(tmp_path, capsys):
    trainer = _trainer(tmp_path, "train.steps=8", "train.max_nonfinite_steps=2")
    names = [n for n, _ in trainer.model.named_parameters()]
    target = names[len(names) // 2]  # not the first parameter: the message must name this one
    _poison_grad_at(trainer, target, {2, 3, 4, 5})
    with pytest.raises(NonFiniteError) as err:
        trainer.run()
    message = str(err.value)
    assert message.startswith("step 4: loss ") and "not finite for 3 step(s) in a row" in message
    assert "(train.max_nonfinite_steps=2)" in message
    assert message.endswith(f"first parameter with a non-finite gradient: {target}")
    out = capsys.readouterr().out
    assert "step 2: loss" in out and "step 3: loss" in out and "(2 in a row, train.max_nonfinite_steps=2)" in out
    assert trainer.scheduler.last_epoch == 1  # only step 1 stepped


def test_nonfinite_loss_alone_is_caught():
    guard = NonFiniteGuard(0)
    model = torch.nn.Linear(2, 2)
    assert guard.check(1, torch.tensor(1.0), torch.tensor(2.0), model)
    with pytest.raises(NonFiniteError, match="none on this rank \\(the loss itself is not finite\\)"):
        guard.check(2, torch.tensor(math.inf), torch.tensor(2.0), model)


def test_clip_with_norm_matches_clip_grad_norm():
    torch.manual_seed(0)
    a, b = torch.nn.Linear(8, 8), torch.nn.Linear(8, 8)
    b.load_state_dict(a.state_dict())
    x = torch.randn(4, 8)
    for m in (a, b):
        m(x).pow(2).sum().backward()
    norm = torch.nn.utils.clip_grad_norm_(a.parameters(), 0.1)
    clip_with_norm(b, 0.1, torch.nn.utils.get_total_norm([p.grad for p in b.parameters()], 2.0))
    assert all(torch.equal(p.grad, q.grad) for p, q in zip(a.parameters(), b.parameters()))
    assert norm > 0.1


def test_collapse_monitor_streaks():
    monitor = CollapseMonitor(0.9, 2, 4)

    def record(loads):
        return {"moe/layer0/load_max_over_mean": 1.0, "moe/layer3/load_max_over_mean": 1.0,
                "moe/tokens_per_expert": loads}

    balanced = [10, 10, 10, 10]
    assert monitor.update(1, record([[1, 95, 2, 2], balanced])) == []
    assert monitor.update(2, record([balanced, balanced])) == []  # the streak is broken
    assert monitor.update(3, record([[1, 95, 2, 2], balanced])) == []
    (warning,) = monitor.update(4, record([[0, 97, 1, 2], [1, 1, 1, 97]]))
    assert warning.startswith("warning: step 4: routing collapse in MoE layer 0: expert 1 took 97% of its tokens")
    assert "for 2 log intervals in a row (train.collapse_share=0.9, train.collapse_steps=2)" in warning
    (warning,) = monitor.update(5, record([[0, 97, 1, 2], [1, 1, 1, 97]]))  # layer 0 warned once per streak
    assert "MoE layer 3: expert 3 took 97%" in warning
    # Without per-expert loads: the share from max/mean, the expert not named.
    blind = CollapseMonitor(0.9, 1, [4, 8])
    (warning,) = blind.update(1, {"moe/layer1/load_max_over_mean": 7.6})
    assert "MoE layer 1: one expert (set logging.expert_loads=true to name it) took 95%" in warning


def test_collapse_is_warned_in_a_real_run(tmp_path, capsys):
    trainer = _trainer(tmp_path, "train.steps=3", "moe.top_k=1", "moe.aux_free=true", "moe.aux_free_update_rate=0",
                       "train.collapse_steps=2", "train.collapse_share=0.9")
    from models.moe import moe_layers

    with torch.no_grad():
        moe_layers(trainer.model)[1].expert_bias_E[5] = 100.0  # every token of MoE layer 1 to expert 5
    trainer.run()
    err = capsys.readouterr().err
    assert "warning: step 2: routing collapse in MoE layer 1: expert 5 took 100% of its tokens" in err
    assert "MoE layer 0" not in err
