"""benchmarks/scale_drill.py on the tiny recipe: one process joins a fake process group as a rank
of an 8-rank world, builds that rank through the real Trainer and steps it. The state it measures
on its own tensors (FSDP's shards of the parameters, their gradients, AdamW's moments) must be what
the plan (launch/plan.py, the --dry-run numbers) estimates for that rank, and the plan's largest
rank is the one drilled first."""
import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.integration

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DRILL = os.path.join(ROOT, "benchmarks", "scale_drill.py")
TINY = os.path.join(ROOT, "recipes", "llm", "pretrain_tiny.yaml")
DIT = os.path.join(ROOT, "recipes", "dit", "pretrain_digits_moe.yaml")


def _drill(recipe, *overrides, world="2x4", ranks="both"):
    done = subprocess.run([sys.executable, DRILL, "--recipes", recipe, "--world", world, "--seq-len", "32",
                           "--ranks", ranks, "--set", *overrides], capture_output=True, text=True, env={**os.environ, "PYTHONPATH": ROOT},
                          timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])["recipes"][os.path.basename(recipe)]
    return [result] + result.pop("other_ranks")


def _assert_state_as_planned(entry, what):
    measured, plan = entry["measured_gb"], entry["plan_gb"]
    assert entry["from_plan"] == [], what  # everything measured: the tiny rank fits
    assert measured["grads"] == pytest.approx(plan["grads"], rel=0.01), what
    assert measured["optimizer"] == pytest.approx(plan["optimizer"], rel=0.01), what
    # Parameters, plus the buffers the plan leaves out (RoPE tables, a DiT's positions): a few %.
    assert plan["params"] <= measured["params"] <= plan["params"] * 1.1, what
    assert 0 < measured["activations"] and measured["peak"] >= measured["params"] + measured["optimizer"], what


@pytest.mark.parametrize("name, overrides, ranks", [
    ("fsdp dp=8 ep=2", ["parallel.data_parallel=fsdp", "parallel.ep=2"], "both"),
    ("hsdp 2x4 ep=2, bf16 weights", ["parallel.data_parallel=fsdp", "parallel.dp_shard=4", "parallel.ep=2",
                                     "parallel.fsdp_param_dtype=bf16"], "both"),
    ("pp=2 x fsdp dp=4 ep=4", ["parallel.data_parallel=fsdp", "parallel.pp=2", "parallel.ep=4"], "0,5"),
])
def test_measured_state_is_the_plans(name, overrides, ranks):
    entries = _drill(TINY, *overrides, ranks=ranks)
    assert entries[0]["world"] == 8
    for entry in entries:
        _assert_state_as_planned(entry, f"{name}, rank {entry['rank']}")
    assert [e["rank"] for e in entries][-1:] == ([5] if ranks == "0,5" else [0])  # pp rank 1 holds the other stage


def test_dit_with_its_ema():
    (entry,) = _drill(DIT, "parallel.data_parallel=fsdp", "parallel.ep=2", world="1x4")
    _assert_state_as_planned(entry, "dit fsdp dp=4 ep=2")  # optimizer: AdamW's 2 copies and the EMA's
    assert entry["plan_gb"]["optimizer"] == pytest.approx(3 * entry["plan_gb"]["grads"], rel=1e-3)


def test_refuses_ddp_with_a_clear_line():
    done = subprocess.run([sys.executable, DRILL, "--recipes", TINY, "--world", "1x2"], capture_output=True,
                          text=True, env={**os.environ, "PYTHONPATH": ROOT}, timeout=600)
    assert done.returncode != 0
    assert done.stderr.strip().splitlines()[-1] == (
        "pretrain_tiny.yaml: the drill cannot run DDP (its reducer needs the values of the fake group's "
        "all-reduces, which carry none); set parallel.data_parallel=fsdp")
