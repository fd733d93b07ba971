"""The expert-parallel dispatcher and the gradient functions on gloo ranks against a single-process
reference, for every overlap strategy: unit-level checks, the test calls what it checks itself.
Parity of whole runs through the Trainer (its micro steps, DDP, sync, clipping and aux-loss scale)
is tests/distributed/test_expert_parallel_trainer.py.

Layouts: (dp, ep) = (2, 2) on 2 ranks; (4, 4) and (4, 2) on 4 ranks; E = 8 experts.
The router is skewed with a fixed selection bias (aux-free buffer, never updated here): loads
are uneven and expert 7 gets no token. Every rank routes its own tokens, so the reference runs
the unsharded model on each rank's batch in turn.

Checks:
    one layer        outputs, input and parameter gradients, grads after `sync_expert_grads`,
                     the shared-expert overlap hook (rtol 1e-5, atol 1e-5 · max|reference|)
    20 steps         a hand-written loop (model, `sync_expert_grads`, `clip_grad_norm`, AdamW; the
                     reference's aux-loss scale set by the test): loss rtol 1e-4, grad norm rtol 1e-3
AdamW amplifies rounding over the steps (chunking adds more: matmuls over row subsets, expert
grads summed chunk by chunk), up to 1.5e-4 on the gradient norm by step 20; the same 20 steps in
float64 agree to 1e-14 for every strategy, so that is rounding, not a difference in what is computed.
One spawn per world size runs every layout, case and strategy (spawning dominates the time).
"""
import pytest
import torch

from tests.helpers.dist import run_distributed

pytestmark = pytest.mark.distributed

STRATEGIES = ("none", "async", "chunked", "shared_expert", "combinable")
LAYOUTS = {2: [(2, 2)], 4: [(4, 4), (4, 2)]}  # world size -> (dp, ep) layouts run in one spawn
E, D, B, S = 8, 16, 4, 16  # layer tests: T = 64 tokens per rank
SKEW_BIAS = [0.3, 0.2, 0.1, 0.05, 0.0, 0.0, 0.02, -1e3]  # expert 7 is never selected
LAYER_CASES = {
    "dropless": {"shared_expert_gate": True},
    "capacity": {"capacity_factor": 1.0, "pad_to_capacity": True},  # drops + padded even splits
    "expert_choice": {"routing": "expert_choice", "aux_free": False},
}
STEPS, SEQ, BATCH, VOCAB, MAX_NORM, CHUNKS = 20, 32, 2, 64, 0.3, 3


def _close(actual, expected, rtol=1e-5, what=""):
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=rtol * float(expected.abs().max()) + 1e-12,
                               msg=lambda m: f"{what}: {m}")


def _skew(model):
    from models.moe import moe_layers

    for layer in moe_layers(model):
        if layer.expert_bias_E is not None:
            layer.expert_bias_E.copy_(torch.tensor(SKEW_BIAS))


def _layer(case):
    from models.moe import MoE
    from models.config import MoEConfig

    torch.manual_seed(0)
    fields = {"aux_free": True, **LAYER_CASES[case]}
    cfg = MoEConfig(num_experts=E, top_k=2, expert_ffn_dim=16, num_shared_experts=1, **fields)
    layer = MoE(D, cfg)
    layer.init_weights(0.2, 0.2)
    _skew(layer)
    return layer


def _layer_inputs(rank):
    g = torch.Generator().manual_seed(100 + rank)
    return torch.randn(B, S, D, generator=g), torch.randn(B, S, D, generator=g)


def _model():
    import models
    from models.config import MoEConfig, ModelConfig

    torch.manual_seed(0)
    model = models.build_model(
        ModelConfig(vocab_size=VOCAB, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, ffn_dim=64,
                    max_seq_len=SEQ),
        MoEConfig(num_experts=E, top_k=2, expert_ffn_dim=32, num_shared_experts=1, aux_free=True))
    _skew(model)
    return model


def _batch(step, rank):
    g = torch.Generator().manual_seed(1000 * step + rank)
    # Skewed token distribution: a unigram the model can learn in 20 steps.
    tokens = torch.multinomial(torch.linspace(1.0, 0.05, VOCAB), BATCH * (SEQ + 1), True, generator=g)
    tokens = tokens.view(BATCH, SEQ + 1)
    return tokens[:, :-1], tokens[:, 1:]


def _optimizer(model):
    return torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)


# -- what every rank runs ----------------------------------------------------------------------------


def _layer_step(layer, mesh, rank):
    """Forward/backward of one rank's batch; grads before and after sync_expert_grads."""
    from parallel import sync_expert_grads

    x, gy = _layer_inputs(rank)
    x.requires_grad_(True)
    y = layer(x)
    (y * gy).sum().backward()
    raw = {n: p.grad.clone() for n, p in layer.named_parameters()}
    sync_expert_grads(layer, mesh)
    synced = {n: p.grad.clone() for n, p in layer.named_parameters() if n.startswith("experts.")}
    # The shared-expert hook, called as a patched MoE layer calls it: same output, same grads of
    # the routed and shared experts (the router's differ: no aux loss on this path).
    layer.zero_grad()
    x2 = x.detach().reshape(-1, D).requires_grad_(True)
    route = layer.router(x2)

    def shared():
        out = layer.shared_experts(x2)
        return out if layer.shared_expert_gate is None else torch.sigmoid(layer.shared_expert_gate(x2)) * out

    y2 = layer.dispatcher(x2, route.routing, layer.experts, overlap_fn=shared)
    (y2 * gy.reshape(-1, D)).sum().backward()
    hooked = {n: p.grad.clone() for n, p in layer.named_parameters() if not n.startswith("router.")}
    return {"y": y.detach(), "dx": x.grad, "raw": raw, "synced": synced, "y_hook": y2.detach().view_as(y),
            "hooked": hooked}


def _train_by_hand(mesh, strategy):
    """20 steps of this test's own loop: `sync_expert_grads` and `clip_grad_norm` called here."""
    from parallel import all_reduce_mean, clip_grad_norm, parallelize, sync_expert_grads, unwrap
    from trainer.config import Config
    from trainer.lm.task import lm_loss

    cfg = Config()
    cfg.parallel.ep, cfg.parallel.ep_overlap, cfg.parallel.ep_chunks = mesh.ep, strategy, CHUNKS
    model = parallelize(_model(), mesh, cfg.parallel)
    optimizer = _optimizer(unwrap(model))
    losses, norms = [], []
    for step in range(STEPS):
        inputs, targets = _batch(step, mesh.dp_rank)
        loss = lm_loss(model(inputs), targets)
        loss.backward()
        sync_expert_grads(model, mesh)
        norms.append(clip_grad_norm(model, mesh, MAX_NORM).item())
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(all_reduce_mean(loss.detach(), mesh.dp_group).item())
    return losses, norms


def _ranks(rank, world_size):
    from parallel import apply_expert_parallel, build_mesh
    from parallel.config import ParallelConfig

    out = {}
    for dp, ep in LAYOUTS[world_size]:
        mesh = build_mesh(ParallelConfig(ep=ep), torch.device("cpu"))
        assert (mesh.dp, mesh.ep, mesh.ep_rank, mesh.edp_rank) == (dp, ep, rank % ep, rank // ep)
        for strategy in STRATEGIES:
            for case in LAYER_CASES:
                layer = apply_expert_parallel(_layer(case), mesh, strategy, CHUNKS)
                out[(dp, ep, "layer", case, strategy)] = _layer_step(layer, mesh, rank)
            out[(dp, ep, "train", strategy)] = _train_by_hand(mesh, strategy)
    return out


# -- single-process references -----------------------------------------------------------------------


def _layer_reference(case, dp):
    """Per rank r: output, input grad and parameter grads of loss_r on the unsharded layer."""
    per_rank = []
    layer = _layer(case)
    for rank in range(dp):
        layer.zero_grad()
        x, gy = _layer_inputs(rank)
        x.requires_grad_(True)
        y = layer(x)
        (y * gy).sum().backward()
        per_rank.append({"y": y.detach(), "dx": x.grad,
                         "grads": {n: p.grad.clone() for n, p in layer.named_parameters()}})
    loads_E = layer.pop_stats()["tokens_per_expert"]
    return per_rank, loads_E


def _train_reference(dp):
    """The same 20 steps on one process: the dp ranks' batches as accumulation micro steps."""
    from models.moe import set_aux_loss_scale
    from trainer.lm.task import lm_loss

    model = _model()
    set_aux_loss_scale(model, 1.0 / dp)  # DDP averages the ranks' aux-loss gradients too
    optimizer = _optimizer(model)
    losses, norms = [], []
    for step in range(STEPS):
        total = 0.0
        for rank in range(dp):
            inputs, targets = _batch(step, rank)
            loss = lm_loss(model(inputs), targets) / dp
            loss.backward()
            total += loss.item()
        norms.append(torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_NORM).item())
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(total)
    return losses, norms


@pytest.fixture(scope="module", params=sorted(LAYOUTS))
def world(request):
    torch.set_num_threads(1)
    results = run_distributed(_ranks, request.param, timeout_s=240)
    return request.param, results


def _check_layer(world, case):
    world_size, results = world
    for dp, ep in LAYOUTS[world_size]:
        reference, loads_E = _layer_reference(case, dp)
        if case != "expert_choice":
            assert loads_E[7] == 0 and loads_E.max() > 2 * loads_E[loads_E > 0].min(), loads_E
        L = E // ep
        for strategy in STRATEGIES:
            for rank in range(world_size):
                got, ref = results[rank][(dp, ep, "layer", case, strategy)], reference[rank]
                where = f"dp={dp} ep={ep} {strategy} rank {rank}"
                _close(got["y"], ref["y"], what=f"{where} output")
                _close(got["y_hook"], ref["y"], what=f"{where} output with overlap_fn")
                _close(got["dx"], ref["dx"], what=f"{where} input grad")
                ep_group = [r for r in range(world_size) if r // ep == rank // ep]
                shard = slice((rank % ep) * L, (rank % ep + 1) * L)
                for name, grad in got["raw"].items():
                    if name.startswith("experts."):
                        # the owner's grad sums every ep rank's tokens (reverse all-to-all)
                        expected = sum(reference[r]["grads"][name] for r in ep_group)[shard]
                        _close(got["synced"][name],
                               sum(reference[r]["grads"][name] for r in range(dp))[shard] / dp,
                               what=f"{where} synced {name}")
                        _close(got["hooked"][name], grad, what=f"{where} {name} with overlap_fn")
                    else:  # replicated: this rank's own gradient (DDP is not part of this test)
                        expected = ref["grads"][name]
                        if name.startswith("shared_"):
                            _close(got["hooked"][name], grad, what=f"{where} {name} with overlap_fn")
                    _close(grad, expected, what=f"{where} {name}")


@pytest.mark.parametrize("case", sorted(LAYER_CASES))
def test_layer_outputs_and_gradients_match_single_process(world, case):
    _check_layer(world, case)


def test_sync_expert_grads_and_clip_grad_norm_over_twenty_steps_match_single_process(world):
    world_size, results = world
    for dp, ep in LAYOUTS[world_size]:
        ref_losses, ref_norms = _train_reference(dp)
        assert ref_losses[-1] < ref_losses[0] - 0.1  # it learns
        assert min(ref_norms) > MAX_NORM  # so clipping, and the sharded norm, matter every step
        for strategy in STRATEGIES:
            for rank in range(world_size):
                losses, norms = results[rank][(dp, ep, "train", strategy)]
                where = f"dp={dp} ep={ep} {strategy} rank {rank}"
                assert losses == pytest.approx(ref_losses, rel=1e-4), where
                assert norms == pytest.approx(ref_norms, rel=1e-3), where
