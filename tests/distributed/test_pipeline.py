"""Pipeline parallelism (torch.distributed.pipelining) against a single-process reference.

What "the same" means: a pipelined micro step splits its batch into m microbatches, each routed
and given its MoE aux losses on its own. The reference is therefore the non-pipelined model
accumulating gradients over the same m microbatches (grad_accum = m · accumulation, micro batch
= micro batch / m): with aux losses, z-loss and clipping on, that is exactly the same computation
in another order.

Cases:
    model level (one step): every schedule at pp=2; gradients of every parameter, rtol 1e-5. The
        test sets the aux-loss scale on both sides itself: a check of parallel/pipeline.py's
        stages and schedules, not of the Trainer
    trainer level (20 steps through trainer.loop.Trainer, real data, AdamW, clipping, aux + z
        losses on; the Trainer sets the aux-loss scale and runs the micro steps, sync and clip):
        pp=2 with gpipe, 1f1b, interleaved_1f1b, zbv and dualpipev on 2 ranks, and
        pp=2 x dp=2 with ep=2 (every schedule, combinable EP overlap) on 4 ranks,
        against one process accumulating the same microbatches: per-step loss rtol 1e-4,
        gradient norm rtol 1e-3 (AdamW amplifies rounding over the steps, as in the EP test)
    the Trainer's aux-loss scale under pp (20 steps): pp=2 with 1f1b x 2 accumulation steps and
        with interleaved_1f1b, 4 forwards per step, against one process accumulating them, with
        coefficients 10x the cases above: at 0.01 a factor-2 error in the scale moves the step-1
        gradient norm by ~5e-4 (inside the tolerance, caught later only through routing counts);
        here by 0.7% (halved) and 1.9% (doubled), and the test asserts that margin
    resume across pp: pp=2 stopped at step 3 resumes on 1 process (pp=1), and a pp=1 run stopped
        at step 3 resumes on 2 ranks (pp=2): the losses after the resume equal the uninterrupted
        run's within rtol 1e-4. Here the balance loss coefficient is 0 (the z-loss stays on): the
        Switch loss of a half batch is not that of the whole batch, so pp=2 and pp=1 would differ
        by design, not by resharding.
"""
import json
import os

import pytest
import torch

from parallel.config import PP_SCHEDULES, V_SCHEDULES
from parallel.pipeline import zero_bubble_works
from tests.helpers.dist import run_distributed
from trainer.recipe import load_config

pytestmark = pytest.mark.distributed

# zbv and dualpipev need a torch whose weight-gradient pass runs through custom autograd nodes (2.13,
# not 2.11: parallel/pipeline.py); where it does not, they are refused and the tests use the rest.
ZERO_BUBBLE = zero_bubble_works()
SCHEDULES = tuple(s for s in PP_SCHEDULES if ZERO_BUBBLE or s not in V_SCHEDULES)
TWO_STAGES_PER_RANK = "zbv" if ZERO_BUBBLE else "interleaved_1f1b"  # rank 0 holds [0, 3] or [0, 2]
SMALL = ["data.max_bytes=300000", "data.seq_len=32", "model.d_model=32", "model.num_layers=4",
         "model.num_heads=4", "model.num_kv_heads=2", "model.ffn_dim=64", "moe.num_experts=4",
         "moe.expert_ffn_dim=32", "moe.num_shared_experts=1", "moe.aux_loss_coeff=0.01",
         "moe.z_loss_coeff=0.001", "logging.wandb=false", "logging.progress_bar=false", "train.log_every=1",
         "eval.every=0", "eval.batches=2", "optim.warmup_steps=2", "optim.grad_clip=0.5",
         "checkpoint.enabled=false"]
STEPS, MICRO = 20, 8


def _cfg(*extra):
    return load_config("recipes/llm/pretrain_tiny.yaml", SMALL + [f"train.steps={STEPS}", *extra])


def _pp_cfg(schedule, *extra):
    micro = 4 if schedule == "dualpipev" else 2  # dualpipev needs as many microbatches as stages
    return _cfg("parallel.pp=2", f"parallel.pp_schedule={schedule}", f"parallel.pp_microbatches={micro}",
                f"train.micro_batch_size={MICRO}", *extra)


def _reference_cfg(microbatches, dp=1, accum=1):
    """One process accumulating every (micro step, dp rank, microbatch) of a step, in order."""
    return _cfg(f"train.micro_batch_size={MICRO // microbatches}",
                f"train.grad_accum_steps={microbatches * dp * accum}")


def _train(cfg, run_dir, resume_from=None):
    from trainer.loop import Trainer

    os.makedirs(run_dir, exist_ok=True)
    trainer = Trainer(cfg, run_dir, resume_from)
    trainer.run()
    return trainer


def _records(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def _history(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return {r["step"]: r for r in rows if "loss" in r}


def _assert_same_history(actual, expected, steps, what):
    """Loss, gradient norm and every router statistic (from every stage) at every step."""
    for step in steps:
        a, e = actual[step], expected[step]
        assert a["loss"] == pytest.approx(e["loss"], rel=1e-4), f"{what}: loss at step {step}"
        assert a["grad_norm"] == pytest.approx(e["grad_norm"], rel=1e-3), f"{what}: grad norm at step {step}"
        router_keys = {k for k in e if k.startswith("moe/")}
        assert router_keys and {k for k in a if k.startswith("moe/")} == router_keys, f"{what}: step {step}"
        for k in router_keys:
            if isinstance(e[k], list):  # moe/tokens_per_expert: exact counts
                assert a[k] == e[k], f"{what}: {k} at step {step}"
            else:
                assert a[k] == pytest.approx(e[k], rel=1e-3, abs=1e-6), f"{what}: {k} at step {step}"


# -- model level: one step, every parameter's gradient ------------------------------------------


def _model_and_batch():
    import models

    cfg = _cfg()
    torch.manual_seed(0)
    model = models.build_model(cfg.model, cfg.moe)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, cfg.model.vocab_size, (MICRO, 32), generator=g)
    y = torch.randint(0, cfg.model.vocab_size, (MICRO, 32), generator=g)
    return model, x, y


def _one_step_grads(rank, world_size, schedule):
    from models.moe import set_aux_loss_scale
    from parallel import build_mesh, parallelize_pipeline
    from parallel.config import pp_microbatches
    from trainer.lm.task import lm_loss

    cfg = _pp_cfg(schedule)
    mesh = build_mesh(cfg.parallel, torch.device("cpu"))
    model, x, y = _model_and_batch()
    set_aux_loss_scale(model, 1.0 / pp_microbatches(cfg.parallel))
    pipe = parallelize_pipeline(model, mesh, cfg.parallel, lm_loss, micro_batch_size=cfg.train.micro_batch_size,
                                grad_accum_steps=cfg.train.grad_accum_steps, seq_len=cfg.data.seq_len)
    loss = pipe.broadcast_from_last(pipe.step((x,), y), mesh.device)
    return loss.item(), {n: p.grad.clone() for n, p in pipe.module.named_parameters()}, pipe.stage_ids


def _run_model_level(rank, world_size):
    return {s: _one_step_grads(rank, world_size, s) for s in SCHEDULES}


def test_every_schedule_gives_the_reference_gradients():
    """Stages and schedules alone: both sides' aux-loss scale is set here, not by the Trainer."""
    from models.moe import set_aux_loss_scale
    from parallel.config import pp_microbatches
    from trainer.lm.task import lm_loss

    results = run_distributed(_run_model_level, 2)
    for schedule in SCHEDULES:
        m = pp_microbatches(_pp_cfg(schedule).parallel)
        model, x, y = _model_and_batch()
        set_aux_loss_scale(model, 1.0 / m)
        ref_loss = 0.0
        for xs, ys in zip(x.chunk(m), y.chunk(m)):
            loss = lm_loss(model(xs), ys) / m
            loss.backward()
            ref_loss += loss.item()
        expected = dict(model.named_parameters())
        seen = set()
        for loss, grads, stage_ids in (r[schedule] for r in results):
            assert loss == pytest.approx(ref_loss, rel=1e-5), schedule
            for name, grad in grads.items():
                ref = expected[name].grad
                torch.testing.assert_close(grad, ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()),
                                           msg=lambda msg: f"{schedule} {name}: {msg}")
                seen.add(name)
        assert seen == set(expected), f"{schedule}: parameters held by no stage: {set(expected) - seen}"
    # V schedules: rank 0 holds the first and the last stage
    if ZERO_BUBBLE:
        assert results[0]["zbv"][2] == [0, 3] and results[1]["zbv"][2] == [1, 2]
    assert results[0]["interleaved_1f1b"][2] == [0, 2]


def test_zero_bubble_refused_where_torch_cannot_run_it(monkeypatch):
    """A torch without the weight pass (2.11) refuses zbv and dualpipev with one line, before any
    stage exists; 1f1b is unaffected."""
    from parallel import pipeline

    monkeypatch.setattr(pipeline, "zero_bubble_works", lambda: False)
    for schedule in V_SCHEDULES:
        with pytest.raises(RuntimeError, match=rf"^parallel\.pp_schedule={schedule}: this torch .* use 1f1b"):
            pipeline.build_pipeline(None, None, _pp_cfg(schedule).parallel, None, micro_batch_size=MICRO)


# -- trainer level: 20 steps -----------------------------------------------------------------------


def _run_schedules(rank, world_size, out):
    for schedule in SCHEDULES:
        # two stages per rank also draw expert-load heatmaps: loads gathered from both ranks' stages
        extra = ["logging.heatmap_every=10"] if schedule == TWO_STAGES_PER_RANK else []
        _train(_pp_cfg(schedule, *extra), os.path.join(out, schedule))
    # gradient accumulation over 2 micro steps of 2 microbatches each
    _train(_pp_cfg("1f1b", "train.grad_accum_steps=2"), os.path.join(out, "1f1b_accum2"))


def _run_pp_dp_ep(rank, world_size, out):
    for schedule in SCHEDULES:
        _train(_pp_cfg(schedule, "parallel.ep=2", "parallel.ep_overlap=combinable"),
               os.path.join(out, f"ep_{schedule}"))


def _run_reference(out, name, cfg):
    _train(cfg, os.path.join(out, name))
    return _history(os.path.join(out, name))


def test_pipelined_training_matches_one_process(tmp_path):
    out = str(tmp_path)
    run_distributed(_run_schedules, 2, out)
    references = {}
    for schedule in SCHEDULES:
        m = 4 if schedule == "dualpipev" else 2
        if m not in references:
            references[m] = _run_reference(out, f"ref_m{m}", _reference_cfg(m))
        _assert_same_history(_history(os.path.join(out, schedule)), references[m], range(1, STEPS + 1), schedule)
    reference = _run_reference(out, "ref_accum2", _reference_cfg(2, accum=2))
    _assert_same_history(_history(os.path.join(out, "1f1b_accum2")), reference, range(1, STEPS + 1), "1f1b accum 2")
    plots = sorted(os.listdir(os.path.join(out, TWO_STAGES_PER_RANK, "plots")))
    assert plots == ["expert_load_step_00000010.png", "expert_load_step_00000020.png"], plots
    for step in (10, 20):  # every MoE layer, from both ranks' stages, is logged
        history = _history(os.path.join(out, TWO_STAGES_PER_RANK))
        assert len(history[step]["moe/tokens_per_expert"]) == 4  # 4 MoE layers


def test_pp_dp_ep_composition_matches_one_process(tmp_path):
    out = str(tmp_path)
    run_distributed(_run_pp_dp_ep, 4, out)
    references = {}
    for schedule in SCHEDULES:
        m = 4 if schedule == "dualpipev" else 2
        if m not in references:
            references[m] = _run_reference(out, f"ref_m{m}", _reference_cfg(m, dp=2))
        _assert_same_history(_history(os.path.join(out, f"ep_{schedule}")), references[m], range(1, STEPS + 1),
                             f"pp2 x dp2 ep2 {schedule}")


# -- the aux-loss scale the Trainer sets under pp -----------------------------------------------------

# Coefficients 10x the other tests': there a wrong scale moves the step-1 gradient norm by ~5e-4,
# inside the tolerance; here by well over it (asserted below), so step 1 already tells.
AUX_SCALE = ["moe.aux_loss_coeff=0.1", "moe.z_loss_coeff=0.01"]
# Two ways the Trainer reaches 4 forwards per step (4 microbatches of 2 sequences), against one
# reference: 1f1b with 2 microbatches and 2 accumulation steps, interleaved_1f1b with 4 microbatches.
AUX_SCALE_RUNS = {
    "1f1b accum 2": ["parallel.pp_schedule=1f1b", "parallel.pp_microbatches=2", "train.micro_batch_size=4",
                     "train.grad_accum_steps=2"],
    "interleaved_1f1b": ["parallel.pp_schedule=interleaved_1f1b", "parallel.pp_microbatches=4",
                         "train.micro_batch_size=8"],
}
AUX_SCALE_REFERENCE = ["train.micro_batch_size=2", "train.grad_accum_steps=4"]


def _run_aux_scale(rank, world_size, out):
    for name, overrides in AUX_SCALE_RUNS.items():
        _train(_cfg(*AUX_SCALE, "parallel.pp=2", *overrides), os.path.join(out, name.replace(" ", "_")))


def test_trainer_sets_the_pipeline_aux_loss_scale(tmp_path):
    """The scale set by the Trainer (trainer/build.py: 1 / (microbatches x accumulation)), not by
    the test: pp=2 runs of 20 steps against one process accumulating the same 4 forwards per step.
    A scale wrong by a factor 2 either way (applied twice, or missing with 2 microbatches) is the
    reference run with both coefficients doubled or halved (the aux gradient is scale x coefficient
    x d aux; the logged loss is the LM loss alone): their step-1 gradient norms must lie outside the
    tolerance, or the comparison could not tell."""
    out = str(tmp_path)
    run_distributed(_run_aux_scale, 2, out)
    reference = _run_reference(out, "ref", _cfg(*AUX_SCALE, *AUX_SCALE_REFERENCE))
    for name in AUX_SCALE_RUNS:
        _assert_same_history(_history(os.path.join(out, name.replace(" ", "_"))), reference, range(1, STEPS + 1),
                             f"pp=2 {name}")
    want = reference[1]["grad_norm"]
    for factor in (2, 0.5):
        coeffs = [f"moe.aux_loss_coeff={0.1 * factor}", f"moe.z_loss_coeff={0.01 * factor}", "train.steps=1"]
        wrong = _run_reference(out, f"scale_x{factor}", _cfg(*AUX_SCALE_REFERENCE, *coeffs))[1]["grad_norm"]
        assert abs(wrong - want) > 3e-3 * want, f"aux scale x{factor}: step-1 grad norm {wrong} vs {want}"


# -- resume onto another pp size --------------------------------------------------------------------

RESUME = ["moe.aux_loss_coeff=0", "checkpoint.enabled=true", "checkpoint.every=3", "train.steps=6",
          f"train.micro_batch_size={MICRO}"]


def _run_pp2_for_resume(rank, world_size, out):
    _train(_cfg(*RESUME, "parallel.pp=2"), os.path.join(out, "pp2_straight"))
    _train(_cfg(*RESUME, "parallel.pp=2", "train.stop_at_step=3"), os.path.join(out, "pp2_then_pp1"))
    # the other direction: a pp=1 checkpoint (written by the test process) resumed on pp=2
    _train(_cfg(*RESUME, "parallel.pp=2"), os.path.join(out, "pp1_then_pp2"))


def test_resume_onto_another_pipeline_size(tmp_path):
    out = str(tmp_path)
    _train(_cfg(*RESUME), os.path.join(out, "pp1_straight"))
    _train(_cfg(*RESUME, "train.stop_at_step=3"), os.path.join(out, "pp1_then_pp2"))
    run_distributed(_run_pp2_for_resume, 2, out)
    _train(_cfg(*RESUME), os.path.join(out, "pp2_then_pp1"))  # finds the pp=2 step-3 checkpoint
    for resumed, straight in (("pp2_then_pp1", "pp2_straight"), ("pp1_then_pp2", "pp1_straight")):
        history = _history(os.path.join(out, resumed))
        assert set(history) == set(range(1, 7)), resumed  # steps 1-3 before, 4-6 after the resume
        _assert_same_history(history, _history(os.path.join(out, straight)), range(4, 7), resumed)
    # and pp=2 agrees with pp=1 on this configuration, so the comparison above is not vacuous
    _assert_same_history(_history(os.path.join(out, "pp2_straight")), _history(os.path.join(out, "pp1_straight")),
                         range(1, 7), "pp2 vs pp1")


# -- the DiT through the same pipeline --------------------------------------------------------------

DIT = ["model.family=dit", "model.d_model=32", "model.num_layers=4", "model.num_heads=4", "model.ffn_dim=64",
       "model.norm_eps=1e-6", "moe.num_experts=4", "moe.top_k=2", "moe.expert_ffn_dim=32",
       "moe.num_shared_experts=1", "moe.aux_loss_coeff=0", "moe.expert_balance_loss_coeff=0.01",
       "data.source=digits", "logging.wandb=false", "logging.progress_bar=false", "train.log_every=1",
       "eval.every=0", "eval.batches=2", "optim.warmup_steps=2", "optim.grad_clip=0.5",
       "checkpoint.enabled=false", "diffusion.num_samples=20", "diffusion.sample_steps=5",
       "diffusion.sampler=ddim", "train.micro_batch_size=8", "train.steps=8"]


def _dit_model_and_batch():
    import models

    cfg = load_config(None, DIT)
    torch.manual_seed(0)
    model = models.build_model(cfg.model, cfg.moe)
    with torch.no_grad():  # adaLN-Zero starts every block as the identity: give it a real function
        for p in model.parameters():
            if p.abs().sum() == 0:
                p.normal_(std=0.05)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 1, 8, 8, generator=g)
    t = torch.randint(0, 1000, (8,), generator=g).float()
    y = torch.randint(0, 10, (8,), generator=g)
    target = torch.randn(8, 2, 8, 8, generator=g)
    return model, (x, t, y), target


def _mse(out, target):
    return ((out - target) ** 2).mean()


def _dit_one_step(rank, world_size):
    from models.moe import set_aux_loss_scale
    from parallel import build_mesh, parallelize_pipeline

    out = {}
    for schedule in ("1f1b", TWO_STAGES_PER_RANK):
        cfg = load_config(None, DIT + ["parallel.pp=2", f"parallel.pp_schedule={schedule}"], world_size=2)
        mesh = build_mesh(cfg.parallel, torch.device("cpu"))
        model, inputs, target = _dit_model_and_batch()
        set_aux_loss_scale(model, 1.0 / 2 if schedule == "1f1b" else 1.0 / 4)
        pipe = parallelize_pipeline(model, mesh, cfg.parallel, _mse, micro_batch_size=cfg.train.micro_batch_size,
                                grad_accum_steps=cfg.train.grad_accum_steps, seq_len=cfg.data.seq_len)
        loss = pipe.broadcast_from_last(pipe.step(inputs, target), mesh.device)
        out[schedule] = (loss.item(), {n: p.grad.clone() for n, p in pipe.module.named_parameters()})
    # and whole DiT trainings: pp=2 (1f1b) here, pp=1 in the test process
    from trainer.loop import Trainer

    run = os.path.join(os.environ["PP_TEST_OUT"], "dit_pp2")
    os.makedirs(run, exist_ok=True)
    Trainer(load_config(None, DIT + ["parallel.pp=2", "moe.expert_balance_loss_coeff=0"], world_size=2), run).run()
    return out


def test_dit_pipeline_matches_one_process(tmp_path, monkeypatch):
    """DiT stages pass (hidden, conditioning); the gradient through the conditioning reaches the
    first stage's embedders. One step of 1f1b and zbv against the accumulated reference (balance
    loss on), then 8 training steps of pp=2 against pp=1 (balance loss off: a microbatch's balance
    loss is not the whole batch's, and timesteps/noise are keyed by batch, so the runs must agree)."""
    from models.moe import set_aux_loss_scale
    from trainer.loop import Trainer

    monkeypatch.setenv("PP_TEST_OUT", str(tmp_path))
    results = run_distributed(_dit_one_step, 2)
    for schedule, m in (("1f1b", 2), (TWO_STAGES_PER_RANK, 4)):
        model, (x, t, y), target = _dit_model_and_batch()
        set_aux_loss_scale(model, 1.0 / m)
        ref_loss = 0.0
        for xs, ts, ys, gs in zip(x.chunk(m), t.chunk(m), y.chunk(m), target.chunk(m)):
            loss = _mse(model(xs, ts, ys), gs) / m
            loss.backward()
            ref_loss += loss.item()
        expected = dict(model.named_parameters())
        seen = set()
        for r in results:
            loss, grads = r[schedule]
            assert loss == pytest.approx(ref_loss, rel=1e-5), schedule
            for name, grad in grads.items():
                ref = expected[name].grad
                torch.testing.assert_close(grad, ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()) + 1e-12,
                                           msg=lambda msg: f"DiT {schedule} {name}: {msg}")
                seen.add(name)
        assert seen == set(expected), schedule
    run = str(tmp_path / "dit_pp1")
    os.makedirs(run)
    Trainer(load_config(None, DIT + ["moe.expert_balance_loss_coeff=0"]), run).run()
    got, want = _history(str(tmp_path / "dit_pp2")), _history(run)
    # The samples scored at the end come from the EMA weights, which pp=2 updates as pp=1 does.
    evals = [[r for r in _records(path) if "eval/fd" in r][-1] for path in (str(tmp_path / "dit_pp2"), run)]
    assert evals[0]["eval/fd"] == pytest.approx(evals[1]["eval/fd"], rel=1e-3)
    assert sorted(got) == list(range(1, 9))
    for step in range(1, 9):
        assert got[step]["loss"] == pytest.approx(want[step]["loss"], rel=1e-4), step
        assert got[step]["grad_norm"] == pytest.approx(want[step]["grad_norm"], rel=1e-3), step
