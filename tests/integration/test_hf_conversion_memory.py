"""import-hf and export-hf hold a few tensors at a time, not the model: a 2.5 GB bf16
Mixtral-shaped checkpoint (48 layers of 16 experts, no transformers model built: its tensors are
written straight to safetensors, a shard per few layers) goes through both commands, each run by
the real CLI in a subprocess, and each one's peak RSS must stay under 30% of the checkpoint.

Peak RSS is the kernel's ru_maxrss of the command, read by a small parent process (a bare Python
that only spawns it): ru_maxrss survives exec, so a command forked from pytest itself would report
pytest's size. It counts everything the process touched, the interpreter and torch's libraries
included (300-360 MB of the peak, depending on the environment's wheels: torch alone is 220 MB;
the conversion adds a few copies of the largest tensor, a layer's stacked experts of 17 MB),
which is why the model must be large to show the bound: at 1.5 GB a fresh CI environment's
baseline alone took 30.2%.

Then the exported shards hold the source's tensors bit for bit (bf16 kept throughout: the
checkpoint of ours stores bf16), compared one tensor at a time with a digest of each source
tensor taken when it was written: the source is deleted once imported, so the disk holds two
copies of the model at most (5 GB), all removed at the end.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

pytestmark = pytest.mark.integration
pytest.importorskip("safetensors")

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RECIPE = os.path.join(ROOT, "recipes", "llm", "pretrain_tiny.yaml")
# 48 layers × (16 experts × 3 × 1024 × 512 + attention) + 2 × 8192 × 512: 1.26B parameters, 2.5 GB in bf16.
MODEL = ["model.vocab_size=8192", "model.d_model=512", "model.num_layers=48", "model.num_heads=8",
         "model.num_kv_heads=4", "model.tie_embeddings=false", "moe.num_experts=16", "moe.expert_ffn_dim=1024"]
LAYERS_PER_SHARD = 4
# Spawns `argv` and prints its peak RSS (kB): the parent stays a bare interpreter.
PEAK_OF = ("import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True); "
           "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")


def _digest(tensor: torch.Tensor) -> str:
    return hashlib.blake2b(tensor.contiguous().reshape(-1).view(torch.uint8).numpy()).hexdigest()


def _write_source(hf_dir) -> tuple[int, dict[str, str]]:
    """A Mixtral directory of MODEL: random bf16 tensors, per-expert layout, shards with an index,
    config.json from the family's to_hf. Returns the bytes of its tensors and a digest of each."""
    from safetensors.torch import save_file

    import models
    from models.hf.convert import Spec, ours_to_hf
    from models.hf.families import FAMILIES
    from trainer.recipe import load_config

    cfg = load_config(RECIPE, MODEL)
    with torch.device("meta"):
        shapes = {k: t.shape for k, t in models.build_model(cfg.model, cfg.moe).state_dict().items()}
    os.makedirs(hf_dir)
    hf_cfg = FAMILIES["mixtral"].to_hf(cfg.model, cfg.moe)
    hf_cfg["torch_dtype"] = hf_cfg["dtype"] = "bfloat16"
    with open(os.path.join(hf_dir, "config.json"), "w") as f:
        json.dump(hf_cfg, f)
    spec, weight_map, digests, total = Spec("mixtral", "per_expert", cfg.model.num_layers), {}, {}, 0
    generator = torch.Generator().manual_seed(0)
    layers = range(cfg.model.num_layers)
    groups = [[k for k in shapes if k.startswith(tuple(f"layers.{i}." for i in layers[s:s + LAYERS_PER_SHARD]))]
              for s in range(0, len(layers), LAYERS_PER_SHARD)]
    groups.append([k for k in shapes if not k.startswith("layers.")])
    for i, keys in enumerate(groups):
        state = {k: (0.02 * torch.randn(shapes[k], generator=generator)).to(torch.bfloat16) for k in keys}
        tensors = {name: t.clone() for name, t in ours_to_hf(state, spec)}
        file = f"model-{i:05d}.safetensors"
        save_file(tensors, os.path.join(hf_dir, file), metadata={"format": "pt"})
        weight_map.update({name: file for name in tensors})
        digests.update({name: _digest(t) for name, t in tensors.items()})
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        del state, tensors
    with open(os.path.join(hf_dir, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f)
    return total, digests


def _peak_rss(*args) -> int:
    """Run the CLI with `args` in a subprocess; its peak RSS in bytes."""
    env = {**os.environ, "PYTHONPATH": ROOT}
    proc = subprocess.run([sys.executable, "-c", PEAK_OF, sys.executable, "-m", "launch.cli", *args],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return int(proc.stdout.strip().splitlines()[-1]) * 1024


def _weight_files(hf_dir) -> dict[str, list[str]]:
    with open(os.path.join(hf_dir, "model.safetensors.index.json")) as f:
        weight_map = json.load(f)["weight_map"]
    files: dict[str, list[str]] = {}
    for name, file in weight_map.items():
        files.setdefault(file, []).append(name)
    return files


def test_import_and_export_hold_a_few_tensors(tmp_path):
    from safetensors import safe_open

    from trainer.checkpoint import FileSystemReader

    hf_dir, ckpt_dir, out = tmp_path / "hf", tmp_path / "ckpt", tmp_path / "exported"
    try:
        size, digests = _write_source(str(hf_dir))
        assert size >= 2**30
        import_peak = _peak_rss("import-hf", str(hf_dir), "--out", str(ckpt_dir))
        shutil.rmtree(hf_dir)
        ckpt = ckpt_dir / "step_00000000"
        stored = FileSystemReader(str(ckpt)).read_metadata().state_dict_metadata
        assert {m.properties.dtype for m in stored.values() if hasattr(m, "properties")} == {torch.bfloat16}
        export_peak = _peak_rss("export-hf", str(ckpt), "--out", str(out), "--max-shard-size", "400MB")
        print(f"\ncheckpoint {size / 2**20:.0f} MiB (bf16); peak RSS import-hf {import_peak / 2**20:.0f} MiB "
              f"({import_peak / size:.1%}), export-hf {export_peak / 2**20:.0f} MiB ({export_peak / size:.1%})")
        assert import_peak < 0.3 * size, (import_peak, size)
        assert export_peak < 0.3 * size, (export_peak, size)

        exported = _weight_files(out)
        assert len(exported) > 1  # sharded at 400MB, with the index
        assert sorted(n for names in exported.values() for n in names) == sorted(digests)
        for file, names in exported.items():
            with safe_open(os.path.join(out, file), "pt") as shard:
                for name in names:
                    tensor = shard.get_tensor(name)
                    assert tensor.dtype == torch.bfloat16 and _digest(tensor) == digests[name], name
    finally:
        for path in (hf_dir, ckpt_dir, out):
            shutil.rmtree(path, ignore_errors=True)
