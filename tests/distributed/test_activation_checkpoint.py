"""Activation checkpointing (parallel/recompute.py) against the same model without it.

Recompute may change memory only. For each mode (block every 1, block every 2, moe_ffn) against
`none`: the loss, the gradient of every parameter (fp32: rtol 1e-6, atol 1e-7; the recompute runs
the same ops on the same inputs, so they agree to the last bit in practice), and the MoE layers'
step loads and router statistics (one count per training forward, not two).

    one process   the LLM (a dense block, MoE blocks with shared experts, aux + z losses, aux-free
                  bias), also with LoRA in attention and experts (dropout on) and under bf16
                  autocast; the DiT-MoE
    ep=2          2 gloo ranks under DDP, every overlap strategy, dropless and padded capacity, and
                  bf16 autocast: gradients, loads, statistics, and the number of `dist.all_to_all_single` calls
                  per step (wrapped): a recompute replays its forward's exchanges, it sends nothing
    pp=2          1f1b on 2 ranks (4 microbatches, 2 in flight), and pp=2 x dp=2 with ep=2 on 4
                  ranks: every stage's gradients, loads, all-to-alls
    Trainer       ep=2 + block for 4 steps (AdamW, aux-free updates): per-step losses rel 1e-6, every
                  moe/* statistic, tokens_per_expert exactly
Each checkpointing mode is also checked to drop saved tensors (an activation checkpoint that did
nothing would pass every equality above).
"""
import gc
import json
import os

import pytest
import torch

from tests.helpers.dist import run_distributed

pytestmark = pytest.mark.distributed

MODES = {"block1": ("block", 1), "block2": ("block", 2), "moe_ffn": ("moe_ffn", 1)}
STRATEGIES = ("none", "async", "chunked", "shared_expert", "combinable")
CASES = {"dropless": {}, "capacity": {"capacity_factor": 1.0, "pad_to_capacity": True}}
VOCAB, SEQ, BATCH = 64, 16, 4
TRAINER_STEPS = 4


def _par(mode, **fields):
    from parallel.config import ParallelConfig

    kind, every = MODES.get(mode, ("none", 1))
    return ParallelConfig(activation_checkpoint=kind, activation_checkpoint_every=every, **fields)


def _perturb(model, std=0.05):
    """Noise on every weight: zero-initialised parts (LoRA's B, the DiT's adaLN-Zero) get gradients."""
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * std)


def _llm(**moe_fields):
    """4 layers: layer 0 dense, 1 to 3 MoE (block every 2 checkpoints layers 0 and 2)."""
    import models
    from models.config import MoEConfig, ModelConfig

    torch.manual_seed(0)
    model = models.build_model(
        ModelConfig(vocab_size=VOCAB, d_model=32, num_layers=4, num_heads=4, num_kv_heads=2, ffn_dim=64,
                    max_seq_len=SEQ, tie_embeddings=False),
        MoEConfig(num_experts=4, top_k=2, expert_ffn_dim=32, num_shared_experts=1, first_k_dense=1,
                  aux_loss_coeff=0.01, z_loss_coeff=0.001, aux_free=True, **moe_fields))
    _perturb(model)
    return model


def _dit():
    import models
    from models.config import MoEConfig, ModelConfig

    torch.manual_seed(0)
    model = models.build_model(
        ModelConfig(family="dit", d_model=32, num_layers=3, num_heads=4, num_kv_heads=4, ffn_dim=64,
                    image_size=8, patch_size=2, in_channels=1, num_classes=10),
        MoEConfig(num_experts=4, top_k=2, expert_ffn_dim=32, num_shared_experts=1, renormalize=False,
                  expert_balance_loss_coeff=0.01))
    _perturb(model)
    return model


def _tokens(seed):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, VOCAB, (BATCH, SEQ + 1), generator=g)
    return tokens[:, :-1], tokens[:, 1:]


class _CountSaved(torch.autograd.graph.saved_tensors_hooks):
    """Counts the tensors autograd saves outside checkpointed regions (checkpoint's own hooks
    take those inside)."""

    def __init__(self):
        self.count = 0

        def pack(t):
            self.count += 1
            return t

        super().__init__(pack, lambda t: t)

    def __enter__(self):
        super().__enter__()
        return self


class _CountAllToAll:
    """Wraps torch.distributed.all_to_all_single (the dispatcher calls it through the module)."""

    def __enter__(self):
        import torch.distributed as dist

        self.count, self._real = 0, dist.all_to_all_single

        def counted(*args, **kwargs):
            self.count += 1
            return self._real(*args, **kwargs)

        dist.all_to_all_single = counted
        return self

    def __exit__(self, *exc):
        import torch.distributed as dist

        dist.all_to_all_single = self._real


def _step(model, run):
    """`run(model)`: one forward + backward, returning the loss. Returns the loss, every gradient,
    the saved-tensor count, the all-to-alls, the MoE layers' loads and statistics, and how many
    exchange tapes outlive the step (they must go with the graph)."""
    from models.moe import pop_router_stats, pop_step_loads
    from parallel import unwrap
    from parallel.recompute import ExchangeTape

    with _CountSaved() as saved, _CountAllToAll() as a2a:
        loss = run(model).item()
    inner = unwrap(model)
    grads = {n: p.grad.clone() for n, p in inner.named_parameters() if p.requires_grad}
    tapes = sum(type(o) is ExchangeTape for o in gc.get_objects())
    return {"loss": loss, "grads": grads, "saved": saved.count, "a2a": a2a.count, "tapes": tapes,
            "loads": pop_step_loads(inner), "stats": pop_router_stats(inner)}


def _close(got, ref, what):
    assert got["loss"] == pytest.approx(ref["loss"], rel=1e-6, abs=0), f"{what}: loss"
    assert got["tapes"] == 0, f"{what}: {got['tapes']} exchange tapes outlived their graph"
    assert got["grads"].keys() == ref["grads"].keys(), what
    for name, grad in got["grads"].items():
        torch.testing.assert_close(grad, ref["grads"][name], rtol=1e-6, atol=1e-7,
                                   msg=lambda m: f"{what} {name}: {m}")
    assert torch.equal(got["loads"], ref["loads"]), f"{what}: step loads {got['loads']} != {ref['loads']}"
    assert got["stats"].keys() == ref["stats"].keys(), what
    for key, value in got["stats"].items():
        assert value == pytest.approx(ref["stats"][key], rel=1e-6), f"{what}: {key}"


def _compare_modes(results, what):
    """results: mode -> `_step` result; every mode against none, and each one checkpoints."""
    ref = results["none"]
    for mode in MODES:
        _close(results[mode], ref, f"{what} {mode}")
        assert results[mode]["saved"] < ref["saved"], f"{what} {mode}: nothing was checkpointed"
        assert results[mode]["a2a"] == ref["a2a"], f"{what} {mode}: all-to-alls per step"


# -- one process ---------------------------------------------------------------------------------------


def _lm_step(inputs, targets):
    from trainer.lm.task import lm_loss

    def run(model):
        loss = lm_loss(model(inputs), targets)
        loss.backward()
        return loss

    return run


def _one_process(build, run, autocast=False):
    from parallel.recompute import apply_activation_checkpointing

    results = {}
    for mode in ("none", *MODES):
        model = apply_activation_checkpointing(build(), _par(mode))
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            results[mode] = _step(model, run)
    assert results["none"]["loads"].sum() > 0
    return results


def test_llm_one_process():
    _compare_modes(_one_process(_llm, _lm_step(*_tokens(0))), "llm")


def test_llm_with_lora_and_bf16_autocast():
    from models.peft import apply_peft
    from trainer.adapt.config import PeftConfig

    def lora():
        model = _llm()
        apply_peft(model, PeftConfig(method="lora", lora_rank=4, lora_dropout=0.1, train_router=True,
                                     lora_targets=["layers.*.attn.*", "layers.*.ffn.experts"]))
        _perturb(model)
        torch.manual_seed(3)  # the dropout masks: the recompute must draw the same ones
        return model

    results = _one_process(lora, _lm_step(*_tokens(1)))
    assert any(".lora" in name for name in results["none"]["grads"]), "no LoRA parameter trained"
    _compare_modes(results, "llm lora")
    _compare_modes(_one_process(_llm, _lm_step(*_tokens(2)), autocast=True), "llm bf16")


def test_dit_one_process():
    g = torch.Generator().manual_seed(0)
    x, target = torch.randn(3, 1, 8, 8, generator=g), torch.randn(3, 2, 8, 8, generator=g)  # learn_sigma: 2 channels
    t, y = torch.tensor([10.0, 500.0, 900.0]), torch.tensor([1, 4, 7])

    def run(model):
        torch.manual_seed(5)  # the same label dropout in every mode
        loss = torch.nn.functional.mse_loss(model(x, t, y), target)
        loss.backward()
        return loss

    _compare_modes(_one_process(_dit, run), "dit")


def test_config_rules():
    from models.config import ConfigError
    from trainer.recipe import load_config

    recipe = "recipes/llm/pretrain_tiny.yaml"
    cfg = load_config(recipe, ["parallel.activation_checkpoint=block", "parallel.activation_checkpoint_every=2"])
    assert (cfg.parallel.activation_checkpoint, cfg.parallel.activation_checkpoint_every) == ("block", 2)
    bad = {"parallel.activation_checkpoint=layer": "activation_checkpoint",
           "parallel.activation_checkpoint_every=0": "activation_checkpoint_every"}
    for setting, key in bad.items():
        with pytest.raises(ConfigError, match=key):
            load_config(recipe, [setting])
    with pytest.raises(ConfigError, match="no MoE layer"):
        load_config(recipe, ["parallel.activation_checkpoint=moe_ffn", "moe.num_experts=0"])
    with pytest.raises(ConfigError, match="pp_schedule=zbv"):
        load_config(recipe, ["parallel.activation_checkpoint=block", "parallel.pp=2", "parallel.pp_schedule=zbv",
                             "model.tie_embeddings=false"], world_size=2)
    with pytest.raises(ConfigError, match="train.engine=deepspeed: not with parallel.activation_checkpoint"):
        load_config(recipe, ["parallel.activation_checkpoint=moe_ffn", "train.engine=deepspeed"])


# -- expert and pipeline parallelism ---------------------------------------------------------------------


def _ep_runs(mesh_cfg):
    """Every strategy and case under ep=2 (DDP over dp=2), and bf16 autocast with combinable:
    (case, strategy) -> mode -> `_step` result."""
    from parallel import build_mesh, parallelize

    mesh = build_mesh(mesh_cfg, torch.device("cpu"))
    run = _lm_step(*_tokens(10 + mesh.rank))  # other tokens per rank: uneven exchanges
    out = {}
    for case, fields in CASES.items():
        for strategy in STRATEGIES if case == "dropless" else ("none", "chunked"):
            out[(case, strategy)] = {
                mode: _step(parallelize(_llm(**fields), mesh, _par(mode, ep=2, ep_overlap=strategy, ep_chunks=3)),
                            run) for mode in ("none", *MODES)}
    with torch.autocast("cpu", dtype=torch.bfloat16):  # replayed expert outputs are bf16
        out[("bf16", "combinable")] = {
            mode: _step(parallelize(_llm(), mesh, _par(mode, ep=2, ep_overlap="combinable")), run)
            for mode in ("none", *MODES)}
    return out


def _pp_runs(mesh_par):
    """One pipelined step (1f1b, 4 microbatches): mode -> `_step` result of this rank's stage."""
    from models.moe import set_aux_loss_scale
    from parallel import build_mesh, parallelize_pipeline
    from trainer.lm.task import lm_loss

    mesh = build_mesh(mesh_par, torch.device("cpu"))
    inputs, targets = _tokens(20 + mesh.dp_rank)
    out = {}
    for mode in ("none", *MODES):
        model = _llm()
        set_aux_loss_scale(model, 1 / 4)
        fields = {k: getattr(mesh_par, k) for k in ("pp", "ep", "pp_schedule", "pp_microbatches", "pp_layers",
                                                    "ep_overlap")}
        pipe = parallelize_pipeline(model, mesh, _par(mode, **fields), lm_loss, micro_batch_size=BATCH, seq_len=SEQ)
        out[mode] = _step(pipe.module, lambda _: pipe.broadcast_from_last(pipe.step((inputs,), targets), mesh.device))
    return out


def _train(out, name, mode):
    from trainer.loop import Trainer
    from trainer.recipe import load_config

    kind, every = MODES.get(mode, ("none", 1))
    cfg = load_config("recipes/llm/pretrain_tiny.yaml", [
        "data.max_bytes=200000", "data.seq_len=32", "model.d_model=32", "model.num_layers=3", "model.num_heads=4",
        "model.num_kv_heads=2", "model.ffn_dim=64", "moe.num_experts=4", "moe.expert_ffn_dim=32",
        "moe.num_shared_experts=1", "moe.aux_free=true", "train.micro_batch_size=4", f"train.steps={TRAINER_STEPS}",
        "train.log_every=1", "eval.every=0", "eval.batches=1", "optim.warmup_steps=1", "checkpoint.enabled=false",
        "logging.wandb=false", "logging.progress_bar=false", "parallel.ep=2", "parallel.ep_overlap=combinable",
        f"parallel.activation_checkpoint={kind}", f"parallel.activation_checkpoint_every={every}"])
    run_dir = os.path.join(out, name)
    os.makedirs(run_dir, exist_ok=True)
    Trainer(cfg, run_dir).run()


def _two_ranks(rank, world_size, out):
    from parallel.config import ParallelConfig

    ep = _ep_runs(ParallelConfig(ep=2))
    pp = _pp_runs(ParallelConfig(pp=2, pp_schedule="1f1b", pp_microbatches=4, pp_layers=[2, 2]))
    for mode in ("none", "block1"):
        _train(out, mode, mode)
    return ep, pp


def _four_ranks(rank, world_size):
    from parallel.config import ParallelConfig

    return _pp_runs(ParallelConfig(pp=2, ep=2, pp_schedule="1f1b", pp_microbatches=4, pp_layers=[2, 2],
                                   ep_overlap="combinable"))


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("ac"))
    return out, run_distributed(_two_ranks, 2, out, timeout_s=400)


def test_expert_parallel_every_strategy(two_ranks):
    _, results = two_ranks
    for rank, (ep, _) in enumerate(results):
        for (case, strategy), runs in ep.items():
            assert runs["none"]["a2a"] > 0
            _compare_modes(runs, f"ep=2 {case} {strategy} rank {rank}")


def test_pipeline_1f1b(two_ranks):
    _, results = two_ranks
    for rank, (_, pp) in enumerate(results):
        _compare_modes(pp, f"pp=2 rank {rank}")


def test_trainer_losses_and_router_statistics(two_ranks):
    out, _ = two_ranks

    def history(name):
        with open(os.path.join(out, name, "metrics.jsonl")) as f:
            return [r for r in map(json.loads, f) if "loss" in r]

    ref, got = history("none"), history("block1")
    assert len(ref) == len(got) == TRAINER_STEPS
    for a, e in zip(got, ref):
        assert a["loss"] == pytest.approx(e["loss"], rel=1e-6), f"loss at step {e['step']}"
        moe_keys = {k for k in e if k.startswith("moe/")}
        assert "moe/tokens_per_expert" in moe_keys and moe_keys == {k for k in a if k.startswith("moe/")}
        for k in moe_keys:
            if isinstance(e[k], list):  # per-expert counts: exact
                assert a[k] == e[k], f"{k} at step {e['step']}"
            else:
                assert a[k] == pytest.approx(e[k], rel=1e-6, abs=1e-9), f"{k} at step {e['step']}"


def test_pipeline_with_expert_parallel():
    for rank, pp in enumerate(run_distributed(_four_ranks, 4, timeout_s=300)):
        assert pp["none"]["a2a"] > 0
        _compare_modes(pp, f"pp=2 x ep=2 rank {rank}")
