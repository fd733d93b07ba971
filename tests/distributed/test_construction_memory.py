"""No rank ever allocates the whole model: a 4-rank FSDP run with ep=2 constructs a 416 MB (fp32)
MoE model through the real Trainer, from train.seed and from a Hugging Face directory, and each
rank's peak memory during construction stays near its share (a quarter), never the whole.

Memory is what glibc's allocator has handed out (tests/helpers/memory.py: mallinfo2, in-use heap
blocks plus mmapped ones), where torch puts every CPU tensor and safetensors its read buffers;
file pages safetensors maps are page cache, not allocations, and are rightly not counted (maxrss
would count them). The peak is sampled after every tensor op and by a thread every 0.5 ms, from
just before `Trainer(...)` to just after it, relative to just before. A whole model (or a whole
file read) stays allocated for as long as it takes to fill it, so the samples cannot miss it.

    share   the bytes of the parameters and buffers this rank holds after construction (AdamW's
            state is created at the first step, so construction holds none)
    bound   share + 2 × the largest tensor construction handles at once + 24 MB. Initial values of
            one tensor's local experts are drawn expert by expert, concatenated, then the rank's
            shard copied out (two copies); a Hugging Face expert tensor is read expert by expert
            and stacked (two copies). The 24 MB: the process groups and device meshes (8.5 MB
            measured), the data (about 5 MB), Python objects. The data library's code is
            imported before the baseline (21 MB of modules, not construction).
and the peak must also reach 90% of the share: a meter that saw nothing would fail.
"""
from __future__ import annotations

import json
import os

import pytest
import torch

from tests.helpers.dist import run_distributed
from tests.helpers.memory import in_use

pytestmark = [pytest.mark.distributed,
              pytest.mark.skipif(in_use() is None, reason="needs glibc's mallinfo2")]

WORLD = 4
# 8 experts of 3 × 2048 × 512 in each of 4 layers: 101M expert parameters, 104M in all (416 MB).
MODEL = ["model.d_model=512", "model.num_layers=4", "model.num_heads=8", "model.num_kv_heads=4",
         "moe.num_experts=8", "moe.expert_ffn_dim=2048"]
RUN = ["parallel.data_parallel=fsdp", "parallel.ep=2", "data.max_bytes=100000", "data.seq_len=32",
       "train.micro_batch_size=2", "logging.wandb=false", "logging.progress_bar=false",
       "logging.heatmap_every=0", "eval.every=0", "checkpoint.enabled=false"]
SLACK = 24e6
# The tensors the correctness check compares: an expert this rank holds (layer 1, w1) and the
# first attention projection, by their names in the Hugging Face files.
HF_EXPERT = "model.layers.1.block_sparse_moe.experts.{}.w1.weight"
HF_WQ = "model.layers.0.self_attn.q_proj.weight"


def _construct(rank, world_size, overrides, run_dir):
    """Construct the Trainer under the meter; returns this rank's numbers (bytes) and, for the
    Hugging Face case, its local w1 of layer 1 and wq of layer 0 with where they sit."""
    import gc

    from parallel.fsdp import local_tensor
    from parallel.materialize import local_part
    from tests.helpers.memory import PeakSampler
    from trainer.loop import Trainer
    from trainer.recipe import load_config

    import datasets  # noqa: F401 - the data library's code (21 MB of Python objects): not construction

    cfg = load_config("recipes/llm/pretrain_tiny.yaml", MODEL + RUN + list(overrides), world_size=world_size)
    os.makedirs(run_dir, exist_ok=True)
    gc.collect()
    base = in_use()
    with PeakSampler() as meter:
        trainer = Trainer(cfg, run_dir)
    model = trainer.unwrapped_model
    held = list(model.parameters()) + list(model.buffers())
    share = sum(local_tensor(t).numel() * t.element_size() for t in held)
    # A tensor before FSDP cuts it (an expert tensor: this rank's experts): construction holds it whole.
    largest = max(torch.Size(local_part(t)[1]).numel() * t.element_size() for t in model.parameters())
    total, _ = trainer.param_counts
    out = {"peak": meter.peak - base, "share": share, "largest": largest, "whole": 4 * total,
           "optimizer_state": len(trainer.optimizer.state)}
    experts = model.layers["1"].ffn.experts
    w1 = experts.w1_EFD
    wq = model.layers["0"].attn.wq.weight
    out["w1"] = (local_part(w1)[0].detach().clone(), experts.expert_offset, local_part(w1)[2])
    out["wq"] = (local_part(wq)[0].detach().clone(), local_part(wq)[2])
    trainer.watchdog.stop()
    return out


def _check_near_share(results):
    for rank, r in enumerate(results):
        bound = r["share"] + 2 * r["largest"] + SLACK
        mb = {k: round(r[k] / 1e6, 1) for k in ("peak", "share", "largest", "whole")}
        print(f"rank {rank}: {mb} MB, bound {bound / 1e6:.1f} MB")
        assert r["optimizer_state"] == 0  # AdamW's moments come at the first step
        assert r["share"] < 0.3 * r["whole"], (rank, mb)  # a quarter of the model, plus shard padding
        assert r["peak"] < r["whole"] / 2, (rank, mb)
        assert 0.9 * r["share"] <= r["peak"] <= bound, (rank, mb, bound / 1e6)


def test_construction_from_the_seed_holds_only_the_share(tmp_path):
    _check_near_share(run_distributed(_construct, WORLD, [], str(tmp_path / "run")))


def _write_hf_dir(path) -> None:
    """A Mixtral directory of MODEL (per-expert layout, one shard per layer and one for the rest,
    model.safetensors.index.json), its tensors random, written a shard at a time so this process
    never holds the whole model either. The names come from our converter; the weight check reads
    the files by names spelled out (HF_EXPERT, HF_WQ), so it does not trust the converter."""
    from safetensors.torch import save_file

    import models
    from models.hf.convert import Spec, ours_to_hf
    from models.hf.families import FAMILIES
    from trainer.recipe import load_config

    cfg = load_config("recipes/llm/pretrain_tiny.yaml", MODEL)
    with torch.device("meta"):
        shapes = {k: t.shape for k, t in models.build_model(cfg.model, cfg.moe).state_dict().items()}
    os.makedirs(path)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(FAMILIES["mixtral"].to_hf(cfg.model, cfg.moe), f)
    spec, weight_map = Spec("mixtral", "per_expert", cfg.model.num_layers), {}
    generator = torch.Generator().manual_seed(0)
    groups = [[k for k in shapes if k.startswith(f"layers.{i}.")] for i in range(cfg.model.num_layers)]
    groups.append([k for k in shapes if not k.startswith("layers.")])
    for i, keys in enumerate(groups):
        state = {k: 0.02 * torch.randn(shapes[k], generator=generator) for k in keys}
        file = f"model-{i:05d}.safetensors"
        tensors = {name: t.contiguous() for name, t in ours_to_hf(state, spec)}
        save_file(tensors, os.path.join(path, file), metadata={"format": "pt"})
        weight_map.update({name: file for name in tensors})
        del state, tensors
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)


def test_init_from_hf_reads_only_the_share(tmp_path):
    pytest.importorskip("safetensors")
    from safetensors import safe_open

    hf_dir = str(tmp_path / "hf")
    _write_hf_dir(hf_dir)
    results = run_distributed(_construct, WORLD, [f"model.init_from=hf:{hf_dir}"], str(tmp_path / "run"))
    _check_near_share(results)
    with open(os.path.join(hf_dir, "model.safetensors.index.json")) as f:
        weight_map = json.load(f)["weight_map"]

    def read(name):
        with safe_open(os.path.join(hf_dir, weight_map[name]), "pt") as handle:
            return handle.get_tensor(name)

    for rank, r in enumerate(results):
        w1, first_expert, offset = r["w1"]
        for e in range(w1.shape[0]):  # this rank's rows of each of its experts
            rows = read(HF_EXPERT.format(first_expert + e))[offset[1]:offset[1] + w1.shape[1]]
            assert torch.equal(w1[e], rows), (rank, e)
        wq, offset = r["wq"]
        assert torch.equal(wq, read(HF_WQ)[offset[0]:offset[0] + wq.shape[0]]), rank
