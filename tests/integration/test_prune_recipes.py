"""The prune recipes end to end on tiny checkpoints: expert pruning through the real CLI on 2 ranks
(calibration summed over dp, report before/after, the compressed checkpoint with fewer experts),
the same command rerun trains on from it under expert parallelism (ep=2) instead of pruning again;
DARE / DAREx-q / TIES / N:M / merging through the Trainer, each checked against the weights it wrote;
router statistics, per-expert loads and heatmaps of a model whose layers have unequal widths;
and the one-line refusals. Tiny shapes and a few steps: what is checked is the plumbing, not the
quality (benchmarks/prune_compare.py measures that).
"""
import json
import os
import subprocess
import sys

import pytest
import torch

from trainer.config import ConfigError
from trainer.recipe import load_config

pytestmark = pytest.mark.integration

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PRUNE = os.path.join(ROOT, "recipes", "llm", "prune_experts.yaml")
DARE = os.path.join(ROOT, "recipes", "llm", "dare.yaml")
SHAPES = ["model.d_model=32", "model.num_layers=2", "model.num_heads=4", "model.num_kv_heads=2",
          "moe.expert_ffn_dim=32"]
RUN = ["data.max_bytes=150000", "data.seq_len=32", "train.micro_batch_size=8", "train.log_every=1",
       "eval.every=0", "eval.batches=2", "optim.warmup_steps=2", "logging.wandb=false",
       "logging.progress_bar=false", "logging.heatmap_every=0", "checkpoint.keep_last=0"]


def sparseforge(*args, timeout=300):
    env = {**os.environ, "PYTHONPATH": ROOT, "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    return subprocess.run([sys.executable, "-m", "launch.cli", *args], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=timeout)


def _trainer(recipe, overrides, run_dir):
    from trainer.loop import Trainer

    os.makedirs(run_dir, exist_ok=True)
    trainer = Trainer(load_config(recipe, SHAPES + RUN + overrides), str(run_dir))
    trainer.run()
    return trainer


def _report(run_dir):
    with open(os.path.join(run_dir, "prune_report.json")) as f:
        return json.load(f)


def _weights(ckpt):
    from trainer.checkpoint import read_model_state

    return read_model_state(str(ckpt))


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    out = tmp_path_factory.mktemp("prune_base")
    _trainer("recipes/llm/pretrain_tiny.yaml", ["train.steps=4", "checkpoint.every=4"], out)
    return str(out / "checkpoints" / "step_00000004")


@pytest.fixture(scope="module")
def finetuned(base, tmp_path_factory):
    """A full fine-tune of the base on pydoc: the delta DARE / TIES compress."""
    out = tmp_path_factory.mktemp("prune_ft")
    _trainer("recipes/llm/finetune_pydoc.yaml", [f"peft.base={base}", "train.steps=3", "checkpoint.every=3",
                                                  "optim.lr=3e-3"], out)
    return str(out / "checkpoints" / "step_00000003")


def test_expert_pruning_through_the_cli_then_rerun_trains_on_under_ep2(base, tmp_path):
    run_dir = tmp_path / "run"
    common = ["run", PRUNE, "--run-dir", str(run_dir), "--nproc-per-node", "2", "--set", *SHAPES, *RUN,
              f"prune.checkpoint={base}", "prune.calib_batches=2", "checkpoint.every=2"]
    proc = sparseforge(*common, "train.steps=0")
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = _report(run_dir)
    assert report["method"] == "experts" and report["prune"]["criterion"] == "reap" and report["dp"] == 2
    assert report["experts_before"] == [8, 8] and report["experts_after"] == [6, 6]
    assert all(len(k) == 6 and k == sorted(k) for k in report["kept"])
    # REAP keeps the highest scores of each layer.
    for scores, kept in zip(report["scores"], report["kept"]):
        dropped = [s for j, s in enumerate(scores) if j not in kept]
        assert max(dropped) <= min(scores[j] for j in kept)
    # Calibrated on 2 micro batches of 8 x 32 tokens on each of the 2 ranks, summed.
    assert report["calib_tokens_per_layer"] == 2 * 2 * 8 * 32
    for phase in ("before", "after"):
        assert 0 < report[phase]["val_loss"] < 10
    assert report["params_after"]["total"] < report["params_before"]["total"]
    assert "prune experts: val loss" in proc.stderr and "experts per MoE layer [8, 8] -> [6, 6]" in proc.stderr
    # The compressed model: an ordinary checkpoint with fewer experts and a config that says so.
    ckpt = run_dir / "checkpoints" / "step_00000000"
    saved = load_config(str(ckpt / "config.yaml"))
    assert saved.moe.num_experts == 6 and saved.prune.method == "none"
    weights = _weights(ckpt)
    assert weights["layers.0.ffn.experts.w1_EFD"].shape[0] == 6
    assert weights["layers.1.ffn.router.gate.weight"].shape[0] == 6
    original = _weights(base)
    for l, kept in enumerate(report["kept"]):  # the kept experts' weights, untouched
        torch.testing.assert_close(weights[f"layers.{l}.ffn.experts.w2_EDF"],
                                   original[f"layers.{l}.ffn.experts.w2_EDF"][kept], rtol=0, atol=0)
    with open(run_dir / "metrics.jsonl") as f:
        first = json.loads(f.readline())
    assert first["step"] == 0 and first["prune/after_val_loss"] == pytest.approx(report["after"]["val_loss"])
    # The same command with training steps: resumes from the compressed checkpoint (nothing is
    # pruned again) and trains it with its 6 experts sharded over ep=2.
    proc = sparseforge(*common, "train.steps=2", "parallel.ep=2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"resumed from {ckpt} at step 0" in proc.stdout + proc.stderr
    assert "prune (before)" not in proc.stderr and "final: step 2, val loss" in proc.stdout
    resumed = load_config(str(run_dir / "checkpoints" / "step_00000002" / "config.yaml"))
    assert resumed.moe.num_experts == 6 and resumed.parallel.ep == 2
    assert _weights(run_dir / "checkpoints" / "step_00000002")["layers.0.ffn.experts.w1_EFD"].shape[0] == 6


def test_dare_darex_ties_write_what_they_report(base, finetuned, tmp_path):
    ft, b = _weights(finetuned), _weights(base)
    keys = [k for k in ft if torch.is_floating_point(ft[k]) and not torch.equal(ft[k], b[k])]
    assert keys  # the fine-tune moved the weights
    common = [f"prune.checkpoint={finetuned}", f"prune.reference={base}", "prune.calib_batches=1"]
    for method, p in (("dare", 0.9), ("darex", 0.5)):
        run_dir = tmp_path / method
        _trainer(DARE, common + [f"prune.method={method}", f"prune.drop_rate={p}"], run_dir)
        report = _report(run_dir)
        q = report["delta"]["q"]
        if method == "dare":
            assert q == pytest.approx(1 - p)
        else:  # tuned on one batch over q in [1 - p, 1]; the errors are reported
            errors = {float(v): e for v, e in report["darex_q_errors"].items()}
            assert 1 - p - 1e-9 <= q <= 1 + 1e-9 and q == pytest.approx(min(errors, key=errors.get), abs=1e-5)
        # Every entry of the written model is the base or base + delta / q; about p of them dropped.
        out = _weights(run_dir / "checkpoints" / "step_00000000")
        kept = total = 0
        for k in keys:
            delta, written = ft[k] - b[k], out[k] - b[k]
            nonzero = written != 0  # a dropped entry is the base's exactly
            assert torch.all(~nonzero | torch.isclose(written, delta / q, rtol=1e-4, atol=1e-6)), k
            kept, total = kept + int((nonzero & (delta != 0)).sum()), total + int((delta != 0).sum())
        assert abs(kept / total - (1 - p)) < 0.03 and report["delta"]["kept_fraction"] == pytest.approx(kept / total, abs=1e-3)
        assert set(report) >= {"before", "after", "reference"}  # fine-tune, compressed, base
    # TIES of the fine-tune with itself at density 1: trimming and the sign election keep everything.
    run_dir = tmp_path / "ties"
    _trainer(DARE, common + ["prune.method=ties", f"prune.ties_checkpoints=[{finetuned}]", "prune.ties_density=1.0"],
             run_dir)
    out = _weights(run_dir / "checkpoints" / "step_00000000")
    for k in keys:
        torch.testing.assert_close(out[k], ft[k], rtol=1e-5, atol=1e-6)


def test_nm_magnitude_and_merging(base, tmp_path):
    run_dir = tmp_path / "nm"
    _trainer(PRUNE, [f"prune.checkpoint={base}", "prune.method=magnitude", 'prune.nm="2:4"', "train.steps=0"], run_dir)
    out = _weights(run_dir / "checkpoints" / "step_00000000")
    for name in ("w1_EFD", "w3_EFD", "w2_EDF"):
        w = out[f"layers.1.ffn.experts.{name}"]
        assert torch.all((w.reshape(*w.shape[:-1], -1, 4) != 0).sum(-1) <= 2)
    assert _report(run_dir)["magnitude"]["expert_zero_fraction"] == pytest.approx(0.5)
    run_dir = tmp_path / "merge"
    _trainer(PRUNE, [f"prune.checkpoint={base}", "prune.method=merge", "prune.sparsity=0.5", "prune.dynamic_skip=true",
                     "prune.calib_batches=2", "train.steps=1", "checkpoint.every=1"], run_dir)
    report = _report(run_dir)
    assert report["experts_after"] == [4, 4]
    assert all(sorted(j for g in groups for j in g) == list(range(8)) for groups in report["groups"])
    saved = load_config(str(run_dir / "checkpoints" / "step_00000001" / "config.yaml"))
    assert saved.moe.num_experts == 4 and len(saved.moe.skip_beta) == 2
    assert saved.moe.skip_beta == report["skip_beta"] and all(0 < b < 1 for b in saved.moe.skip_beta)


def test_unequal_layer_widths_in_router_stats_loads_and_heatmaps(tmp_path):
    """A pruned model's layers of 8 and 4 experts: router statistics, per-expert loads (also rows
    gathered from pipeline stages of different widths) and heatmaps keep each layer's own experts."""
    import models
    from models.moe import pop_router_stats
    from trainer.router_stats import load_stats as _load_stats, stack_rows as _stack_rows
    from trainer.plots import overload_factors, save_expert_load_heatmap

    cfg = load_config("recipes/llm/pretrain_tiny.yaml", SHAPES + ["moe.layer_num_experts=[8,4]"])
    model = models.build_model(cfg.model, cfg.moe)
    model(torch.randint(0, 256, (2, 16))).sum().backward()
    scalars, loads_LE = pop_router_stats(model, with_loads=True)
    assert loads_LE.shape == (2, 8) and loads_LE[1, 4:].isnan().all() and not loads_LE[1, :4].isnan().any()
    stats = _load_stats(loads_LE, sorted(scalars), with_loads=True)
    assert [len(row) for row in stats["moe/tokens_per_expert"]] == [8, 4]
    assert [sum(row) for row in stats["moe/tokens_per_expert"]] == [2 * 16 * 2] * 2  # tokens x top_k
    row = loads_LE[1, :4]
    assert stats["moe/layer1/load_max_over_mean"] == pytest.approx((row.max() / row.mean()).item())
    # Rows of pipeline stages holding layers of different widths.
    stacked = _stack_rows([torch.tensor([1.0, 2.0]), torch.tensor([3.0, 1.0, 1.0, 3.0])])
    assert stacked.shape == (2, 4) and stacked[0, 2:].isnan().all()
    torch.testing.assert_close(overload_factors(stacked), torch.tensor([2.0 / 1.5, 1.5], dtype=torch.float64))
    path = save_expert_load_heatmap(loads_LE, 3, str(tmp_path))
    assert os.path.getsize(path) > 0


def test_recipes_refuse_what_cannot_run(base, tmp_path, monkeypatch, capsys):
    from launch.cli import main

    # A recipe whose checkpoint was never trained (relative to the working directory) fails
    # validation in one line; nothing is spawned.
    monkeypatch.chdir(tmp_path)
    assert main(["run", PRUNE, "--run-dir", str(tmp_path / "r")]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("sparseforge: error: prune.checkpoint: checkpoint directory not "
                                                   "found: runs/pretrain_tiny/checkpoints/step_00000300"), lines
    assert not (tmp_path / "r" / "config.yaml").exists()
    # A checkpoint of another model: the launcher's preflight names the first tensor that differs.
    assert main(["run", PRUNE, "--run-dir", str(tmp_path / "r2"), "--set", *SHAPES, "moe.expert_ffn_dim=16",
                 f"prune.checkpoint={base}"]) == 2
    err = capsys.readouterr().err
    assert "prune.checkpoint: layers.0.ffn.experts.w1_EFD is [8, 32, 32] in" in err and len(err.splitlines()) == 1
    incomplete = tmp_path / "step_00000001"
    incomplete.mkdir()
    cases = [
        (["prune.method=prune"], "prune.method: 'prune' is not one of none, experts, merge"),
        ([f"prune.checkpoint={incomplete}"], "is not a complete checkpoint"),
        (["prune.checkpoint="], "prune.checkpoint: required with prune.method experts"),
        (["prune.criterion=router_norm"], "prune.reference: required with criterion router_norm"),
        (["prune.criterion=size"], "prune.criterion: 'size' is not one of"),
        (["prune.criterion=naee", "prune.budget=global"], "needs budget per_layer"),
        (["prune.method=merge", "prune.budget=global"], "merge keeps the same share per layer"),
        (["prune.sparsity=1.0"], "prune.sparsity: must be in (0, 1), got 1.0"),
        (["prune.budget=layer"], "prune.budget: 'layer' is not one of per_layer, global"),
        (["prune.method=dare"], "prune.reference: required with prune.method dare"),
        (["prune.method=dare", f"prune.reference={base}", "prune.drop_rate=1.0", "train.steps=0"], "prune.drop_rate"),
        (["prune.method=dare", f"prune.reference={base}"], "train.steps=100: prune.method dare makes weights sparse"),
        (["prune.method=ties", f"prune.reference={base}", "prune.ties_density=0"], "prune.ties_density"),
        (["prune.method=ties", f"prune.reference={base}", "prune.ties_checkpoints=[/nope/step_00000001]"],
         "prune.ties_checkpoints[0]: checkpoint directory not found"),
        (["prune.method=magnitude", "prune.nm=2:4", "train.steps=0"], "quote it"),
        (["prune.method=magnitude", 'prune.nm="3:5"', "train.steps=0"], "M must divide"),
        (["peft.method=full", f"peft.base={base}"], "prune first, then fine-tune the pruned checkpoint"),
        (["moe.top_k=1", "prune.dynamic_skip=true"], "prune.dynamic_skip: skips a token's 2nd expert"),
        (["moe.num_groups=2", "moe.topk_group=1"], "group-limited routing"),
    ]
    from launch.preflight import check_sources

    for overrides, message in cases:  # the recipe's rules, then the launcher's checks of its files
        with pytest.raises(ConfigError) as e:
            check_sources(load_config(PRUNE, SHAPES + [f"prune.checkpoint={base}", *overrides]))
        assert message in str(e.value) and "\n" not in str(e.value), (overrides, str(e.value))
