"""PEFT under expert and pipeline parallelism against a single process, through the real Trainer.

A base is pretrained for 4 steps (one process); every PEFT run then trains 4 steps from it.
    ep=2 (dp=2, 2 ranks, micro batch 4)  vs  one process (micro batch 8): the same global batch
        lora on attention + experts (expert LoRA sharded with its experts), PERFT-R (replicated
        adapters, each rank adapts its own tokens), ESFT (selection summed over the ranks)
    pp=2 (1f1b, 2 microbatches)          vs  one process accumulating the same 2 microbatches
        lora on attention + experts
    FSDP dp=2 with ep=2, 2 micro steps   vs  the same one-process accumulation: lora
Per-step losses rtol 1e-5 and final trainable weights rtol 1e-4 (fp32; only the summation order
differs, amplified a little by AdamW). The Switch balance loss is off: it is not linear in the
batch, so a rank's half batch has another balance loss than the whole batch (by design, not by
parallelism); the z-loss stays on. ESFT: the selection is the same on every rank and equals the
single process's, and the unselected experts' rows are bit-identical to the base after training.
One spawn runs every parallel case (spawning dominates the time).
"""
import json
import os

import pytest
import torch

from tests.helpers.dist import run_distributed
from trainer.recipe import load_config

pytestmark = pytest.mark.distributed

SMALL = ["data.max_bytes=200000", "data.seq_len=32", "model.d_model=32", "model.num_layers=2",
         "model.num_heads=4", "model.num_kv_heads=2", "moe.expert_ffn_dim=32", "moe.aux_loss_coeff=0",
         "logging.wandb=false", "logging.progress_bar=false", "train.log_every=1", "eval.every=0",
         "eval.batches=1", "optim.warmup_steps=2", "train.steps=4", "logging.heatmap_every=0"]
METHODS = {
    "lora": ["peft.method=lora", "peft.lora_rank=4", "peft.lora_targets=[layers.*.attn.*, layers.*.ffn.experts]"],
    "perft": ["peft.method=perft", "peft.perft_variant=R", "peft.perft_num_adapters=4", "peft.perft_top_k=2",
              "peft.perft_rank=8"],
    "esft": ["peft.method=esft", "peft.esft_top_p=0.4", "peft.esft_calib_batches=2"],
}
PP = ["parallel.pp=2", "parallel.pp_schedule=1f1b", "parallel.pp_microbatches=2"]
FSDP = ["parallel.data_parallel=fsdp", "parallel.ep=2"]


def _cfg(*extra):
    return load_config("recipes/llm/pretrain_tiny.yaml", SMALL + list(extra))


def _train(cfg, run_dir):
    from trainer.loop import Trainer

    os.makedirs(run_dir, exist_ok=True)
    trainer = Trainer(cfg, run_dir)
    trainer.run()
    return trainer


def _dump(trainer, path):
    """This rank's trainable parameters (expert rows with their offset), all expert weights, and
    the ESFT selection."""
    from parallel import unwrap
    from parallel.checkpoint_adapter import expert_shards

    from torch.distributed.tensor import DTensor

    model = unwrap(trainer.model)

    def whole(p):  # FSDP shards: gathered (every rank calls this for every parameter, in order)
        return (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone()

    experts = {n: whole(p) for n, p in model.named_parameters() if ".experts.w" in n}
    trainable = {n: whole(p) for n, p in model.named_parameters() if p.requires_grad}
    torch.save({"shards": expert_shards(model), "trainable": trainable, "experts": experts,
                "selection": trainer.peft.esft_selection}, path)


def _peft_cfg(base, method, *extra):
    return _cfg(*METHODS[method], f"peft.base={base}", *extra)


def _parallel_runs(rank, world_size, out, base):
    for method in METHODS:  # ep=2 over the whole dp group of 2
        trainer = _train(_peft_cfg(base, method, "parallel.ep=2", "train.micro_batch_size=4"),
                         os.path.join(out, f"{method}_ep2"))
        _dump(trainer, os.path.join(out, f"{method}_ep2_rank{rank}.pt"))
    trainer = _train(_peft_cfg(base, "lora", *PP, "train.micro_batch_size=8"), os.path.join(out, "lora_pp2"))
    _dump(trainer, os.path.join(out, f"lora_pp2_rank{rank}.pt"))
    trainer = _train(_peft_cfg(base, "lora", *FSDP, "train.micro_batch_size=2", "train.grad_accum_steps=2"),
                     os.path.join(out, "lora_fsdp_ep2"))
    _dump(trainer, os.path.join(out, f"lora_fsdp_ep2_rank{rank}.pt"))


def _losses(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return {r["step"]: r["loss"] for r in map(json.loads, f) if "loss" in r}


def _gather(dumps, key):
    """Whole tensors from the ranks' dumps: expert rows placed at their offsets, stages merged."""
    full = {}
    for dump in dumps:
        for name, value in dump[key].items():
            offset, num_global = dump["shards"].get(name, (0, None))
            if num_global is None:
                full[name] = value
                continue
            dest = full.setdefault(name, torch.full((num_global, *value.shape[1:]), float("nan")))
            dest[offset:offset + value.shape[0]] = value
    return full


def _assert_same_weights(actual, expected, what):
    assert sorted(actual) == sorted(expected), what
    for name, ref in expected.items():
        torch.testing.assert_close(actual[name], ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()) + 1e-7,
                                   msg=lambda m: f"{what}: {name}: {m}")


def _assert_same_losses(actual, expected, what):
    assert sorted(actual) == sorted(expected) == [1, 2, 3, 4], what
    for step, loss in expected.items():
        assert actual[step] == pytest.approx(loss, rel=1e-5), f"{what}: loss at step {step}"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The base, the single-process references and every parallel run (one spawn)."""
    out = str(tmp_path_factory.mktemp("peft_parallel"))
    _train(_cfg("train.micro_batch_size=8", "checkpoint.every=4", "moe.aux_loss_coeff=0.01"),
           os.path.join(out, "base"))
    base = os.path.join(out, "base", "checkpoints", "step_00000004")
    for method in METHODS:
        trainer = _train(_peft_cfg(base, method, "train.micro_batch_size=8", "checkpoint.enabled=false"),
                         os.path.join(out, f"{method}_ref"))
        _dump(trainer, os.path.join(out, f"{method}_ref.pt"))
    # The pipeline's reference accumulates the 2 microbatches of each micro step.
    trainer = _train(_peft_cfg(base, "lora", "train.micro_batch_size=4", "train.grad_accum_steps=2",
                               "checkpoint.enabled=false"), os.path.join(out, "lora_pp_ref"))
    _dump(trainer, os.path.join(out, "lora_pp_ref.pt"))
    run_distributed(_parallel_runs, 2, out, base)
    return out, base


def _load(out, name):
    return torch.load(os.path.join(out, name), weights_only=False)


@pytest.mark.parametrize("method", list(METHODS))
def test_peft_under_expert_parallelism_matches_one_process(runs, method):
    out, _ = runs
    _assert_same_losses(_losses(os.path.join(out, f"{method}_ep2")), _losses(os.path.join(out, f"{method}_ref")),
                        f"{method} ep=2")
    ranks = [_load(out, f"{method}_ep2_rank{r}.pt") for r in range(2)]
    ref = _load(out, f"{method}_ref.pt")
    if method == "lora":  # expert LoRA really was sharded: the ranks held different experts' rows
        lora_shards = {n: s for n, s in ranks[0]["shards"].items() if ".lora." in n}
        assert lora_shards and all(s == (0, 8) for s in lora_shards.values())
        assert all(ranks[1]["shards"][n] == (4, 8) for n in lora_shards)
    _assert_same_weights(_gather(ranks, "trainable"), ref["trainable"], f"{method} ep=2 trainable weights")


def test_esft_selection_is_shared_and_frozen_experts_stay_bit_identical(runs):
    out, base = runs
    from trainer.checkpoint import read_model_state

    ranks = [_load(out, f"esft_ep2_rank{r}.pt") for r in range(2)]
    ref = _load(out, "esft_ref.pt")
    selection = ranks[0]["selection"]
    assert selection == ranks[1]["selection"] == ref["selection"]
    assert all(0 < len(chosen) < 8 for chosen in selection)  # some experts trained, some frozen
    base_sd = read_model_state(base)
    trained = _gather(ranks, "experts")
    for name, weight in trained.items():
        layer = int(name.split(".")[1])  # both layers are MoE layers: MoE index = layer index
        frozen = [e for e in range(8) if e not in selection[layer]]
        assert torch.equal(weight[frozen], base_sd[name][frozen]), f"{name}: frozen experts moved"
        chosen = selection[layer]
        assert not torch.equal(weight[chosen], base_sd[name][chosen]), f"{name}: selected experts did not train"


def test_lora_under_pipeline_parallelism_matches_one_process(runs):
    out, _ = runs
    _assert_same_losses(_losses(os.path.join(out, "lora_pp2")), _losses(os.path.join(out, "lora_pp_ref")),
                        "lora pp=2")
    ranks = [_load(out, f"lora_pp2_rank{r}.pt") for r in range(2)]
    assert not set(ranks[0]["trainable"]) & set(ranks[1]["trainable"])  # each stage its own adapters
    _assert_same_weights(_gather(ranks, "trainable"), _load(out, "lora_pp_ref.pt")["trainable"], "lora pp=2")


def test_lora_under_fsdp_with_accumulation_matches_one_process(runs):
    """FSDP dp=2 with ep=2 (the frozen base sharded too), 2 micro steps of 2 sequences per rank:
    against the pipeline's reference, which accumulates 2 micro steps of 4 over one process."""
    out, _ = runs
    _assert_same_losses(_losses(os.path.join(out, "lora_fsdp_ep2")), _losses(os.path.join(out, "lora_pp_ref")),
                        "lora fsdp ep=2")
    ranks = [_load(out, f"lora_fsdp_ep2_rank{r}.pt") for r in range(2)]
    assert not any(".lora" not in n and "router" not in n for n in ranks[0]["trainable"])  # the base stayed frozen
    _assert_same_weights(_gather(ranks, "trainable"), _load(out, "lora_pp_ref.pt")["trainable"], "lora fsdp ep=2")


def test_expert_parallel_adapter_checkpoint_loads_whole(runs):
    """The ep=2 LoRA checkpoint (expert adapters stored as shards of the unsharded tensors) read
    back on one process, without a process group: exactly the adapters the two ranks held."""
    from trainer.adapt.peft import load_peft_model

    out, _ = runs
    _, model = load_peft_model(os.path.join(out, "lora_ep2", "checkpoints", "step_00000004"))
    held = _gather([_load(out, f"lora_ep2_rank{r}.pt") for r in range(2)], "trainable")
    live = dict(model.named_parameters())
    assert sorted(held) == sorted(n for n, p in live.items() if p.requires_grad)
    for name, value in held.items():
        assert torch.equal(live[name].detach(), value), name
