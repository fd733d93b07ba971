"""A bare GPU box (docs/gpu.md) has torch, numpy, pyyaml, transformers, safetensors, scipy,
matplotlib and tqdm, but no wandb, datasets, deepspeed, megablocks or pydantic: every module
imports there, and the tiny recipe trains (stdlib corpus, metrics.jsonl, a checkpoint) with one
warning line for its logging.wandb=true. A child process makes importing those packages fail."""
import json
import math
import os
import subprocess
import sys

from trainer.config import config_to_dict
from trainer.metrics import WANDB_MISSING
from trainer.recipe import load_config

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
HIDDEN = ("wandb", "datasets", "deepspeed", "megablocks", "pydantic")

CHILD = r"""
import importlib, json, pkgutil, sys
HIDDEN = set(sys.argv[3].split(","))

class Missing:
    '''Importing any of HIDDEN fails as it does where the package is not installed.'''
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in HIDDEN:
            raise ModuleNotFoundError(f"No module named {name!r}")

sys.meta_path.insert(0, Missing())
for package in ("models", "parallel", "trainer", "launch"):
    for info in pkgutil.walk_packages(importlib.import_module(package).__path__, package + "."):
        importlib.import_module(info.name)
from trainer.config import config_from_dict  # the recipe loader needs pydantic: rebuild the parent's
from trainer.loop import train

with open(sys.argv[1]) as f:
    result = train(config_from_dict(json.load(f)), sys.argv[2])
print(json.dumps({"final_step": result.final_step, "val_loss": result.final_val_loss,
                  "imported": sorted(m for m in sys.modules if m.partition(".")[0] in HIDDEN)}))
"""


def test_tiny_recipe_trains_without_wandb_datasets_deepspeed_pydantic(tmp_path):
    cfg = load_config(os.path.join(ROOT, "recipes/llm/pretrain_tiny.yaml"),
                      ["train.steps=2", "train.log_every=1", "train.micro_batch_size=4", "data.seq_len=64",
                       "data.max_bytes=200000", "eval.batches=1", "logging.wandb=true",
                       "logging.progress_bar=false", "logging.heatmap_every=2"])
    config_path, run_dir = tmp_path / "config.json", tmp_path / "run"
    config_path.write_text(json.dumps(config_to_dict(cfg)))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WANDB", "RANK", "WORLD_SIZE", "LOCAL_RANK"))}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    out = subprocess.run([sys.executable, "-c", CHILD, str(config_path), str(run_dir), ",".join(HIDDEN)],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["final_step"] == 2 and math.isfinite(result["val_loss"]) and result["imported"] == []
    assert out.stderr.count(WANDB_MISSING) == 1 and "wandb" not in out.stderr.replace(WANDB_MISSING, "")
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2] and all(math.isfinite(r["loss"]) for r in steps)
    assert any("eval/loss" in r for r in records)
    assert (run_dir / "checkpoints" / "step_00000002").is_dir() and not (run_dir / "wandb").exists()
    assert list((run_dir / "plots").glob("expert_load_step_*.png"))
