"""A DiT-MoE under expert parallelism (ep=2 on 2 gloo ranks) against a single process.

The DiT goes through the same `parallel.parallelize` as the LLM (expert shards + all-to-all
dispatcher, DDP for the rest). Each rank trains on its own batch of images, timesteps and noise
(seeded by step and rank); the reference runs the unsharded model on both ranks' batches as
accumulation micro steps, with the aux-loss gradient scaled 1/2 as DDP's averaging does.
Objective: DDPM ε-prediction with the learned-variance VLB term; the expert-level balance loss
and a shared expert are on; label dropout is off (its random draws are per rank).

Tolerances (fp32; expert parallelism only changes summation order):
    one step: output rtol 1e-5; every parameter's gradient rtol 1e-5 (atol 1e-5 · max|ref|)
    20 AdamW steps with clipping: mean loss per step rtol 1e-4, gradient norm rtol 1e-3
"""
import pytest
import torch

from tests.helpers.dist import run_distributed

pytestmark = pytest.mark.distributed

STEPS, BATCH, MAX_NORM = 20, 4, 0.5


def _cfg():
    from trainer.recipe import load_config

    return load_config(None, ["model.family=dit", "model.d_model=32", "model.num_layers=2", "model.num_heads=4",
                              "model.ffn_dim=64", "model.class_dropout_prob=0", "model.norm_eps=1e-6",
                              "moe.num_experts=4", "moe.top_k=2", "moe.expert_ffn_dim=32",
                              "moe.num_shared_experts=1", "moe.aux_loss_coeff=0",
                              "moe.expert_balance_loss_coeff=0.01", "parallel.ep=2"], world_size=2)


def _model():
    import models

    cfg = _cfg()
    torch.manual_seed(0)
    model = models.build_model(cfg.model, cfg.moe)
    with torch.no_grad():  # adaLN-Zero starts every block as the identity: give it a real function
        for p in model.parameters():
            if p.abs().sum() == 0:
                p.normal_(std=0.05)
    return model


def _batch(step, rank):
    from trainer.diffusion.objectives import build_objective

    objective = build_objective(_cfg().diffusion)
    g = torch.Generator().manual_seed(1000 * step + rank)
    x0 = torch.rand(BATCH, 1, 8, 8, generator=g) * 2 - 1
    y = torch.randint(0, 10, (BATCH,), generator=g)
    t = objective.sample_t(BATCH, generator=g)
    noise = torch.randn(x0.shape, generator=g)
    return objective, x0, y, t, noise


def _loss(model, step, rank):
    objective, x0, y, t, noise = _batch(step, rank)
    x_t = objective.q_sample(x0, t, noise)
    out = model(x_t, objective.model_time(t), y)
    return objective.loss(out, x0, x_t, t, noise)["loss"].mean(), out


def _ranks(rank, world_size):
    from parallel import all_reduce_mean, build_mesh, clip_grad_norm, parallelize, sync_expert_grads, unwrap

    cfg = _cfg()
    mesh = build_mesh(cfg.parallel, torch.device("cpu"))
    model = parallelize(_model(), mesh, cfg.parallel)
    loss, out = _loss(model, 0, rank)
    loss.backward()
    sync_expert_grads(model, mesh)
    grads = {n: p.grad.clone() for n, p in unwrap(model).named_parameters()}
    shards = {n: (m.expert_offset, m.num_global_experts) for n, m in unwrap(model).named_modules()
              if hasattr(m, "num_global_experts")}
    model.zero_grad(set_to_none=True)
    optimizer = torch.optim.AdamW(unwrap(model).parameters(), lr=3e-3, weight_decay=0.0)
    losses, norms = [], []
    for step in range(STEPS):
        loss, _ = _loss(model, step, rank)
        loss.backward()
        sync_expert_grads(model, mesh)
        norms.append(clip_grad_norm(model, mesh, MAX_NORM).item())
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(all_reduce_mean(loss.detach(), mesh.dp_group).item())
    return {"out": out.detach(), "grads": grads, "shards": shards, "losses": losses, "norms": norms}


def _reference():
    from models.moe import set_aux_loss_scale

    model = _model()
    set_aux_loss_scale(model, 0.5)
    outs = []
    for rank in range(2):
        loss, out = _loss(model, 0, rank)
        (loss / 2).backward()
        outs.append(out.detach())
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    losses, norms = [], []
    for step in range(STEPS):
        total = 0.0
        for rank in range(2):
            loss, _ = _loss(model, step, rank)
            (loss / 2).backward()
            total += loss.item() / 2
        norms.append(torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_NORM).item())
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(total)
    return outs, grads, losses, norms


def test_dit_expert_parallel_matches_one_process():
    results = run_distributed(_ranks, 2)
    outs, grads, losses, norms = _reference()
    assert losses[-1] < losses[0]  # it learns
    for rank, got in enumerate(results):
        torch.testing.assert_close(got["out"], outs[rank], rtol=1e-5, atol=1e-5 * float(outs[rank].abs().max()))
        assert got["shards"], "no expert shards: expert parallelism did not apply"
        for name, grad in got["grads"].items():
            module = name.rsplit(".", 1)[0]
            ref = grads[name]
            if module in got["shards"]:  # this rank's rows of the experts
                offset, _ = got["shards"][module]
                ref = ref[offset:offset + grad.shape[0]]
            torch.testing.assert_close(grad, ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()) + 1e-12,
                                       msg=lambda m: f"rank {rank} {name}: {m}")
        assert got["losses"] == pytest.approx(losses, rel=1e-4)
        assert got["norms"] == pytest.approx(norms, rel=1e-3)
