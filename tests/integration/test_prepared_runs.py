"""Prepared data through the real CLI: prepare-data, the same loss curve as the in-memory path,
a resume from dp=2 onto another dp size, and bad data refused before any rank starts."""
import json
import os

import pytest

from tests.integration.test_cli import RECIPE, SMALL, _losses, sparseforge

pytestmark = pytest.mark.integration

DATA = ["data.max_bytes=300000"]


def _prepare(tmp_path, *extra):
    out = tmp_path / "prepared"
    proc, _ = sparseforge("prepare-data", RECIPE, "--out", str(out), "--num-proc", "2", "--shard-tokens", "50000",
                          "--no-progress", "--set", *SMALL, *extra)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"prepared {out}: train " in proc.stdout and "documents" in proc.stdout
    return str(out)


def test_prepared_run_has_the_in_memory_loss_curve(tmp_path):
    out = _prepare(tmp_path)
    assert len(json.load(open(os.path.join(out, "manifest.json")))["splits"]["train"]["shards"]) > 1
    common = ["--set", *SMALL, "train.steps=4", "checkpoint.enabled=false", "eval.every=2"]
    runs = {}
    for name, source in (("memory", []), ("prepared", [f"data.source={out}"])):
        proc, _ = sparseforge("run", RECIPE, "--run-dir", str(tmp_path / name), *common, *source)
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs[name] = _losses(tmp_path / name)
    (mem, mem_records), (disk, disk_records) = runs["memory"], runs["prepared"]
    assert sorted(mem) == [1, 2, 3, 4] and disk == mem  # the same windows in the same order: bitwise
    evals = lambda records: [r["eval/loss"] for r in records if "eval/loss" in r]
    assert evals(disk_records) == evals(mem_records)


@pytest.mark.parametrize("nproc, micro_batch, accum", [(1, 4, 2), (4, 2, 1)])
def test_resume_from_dp2_onto_another_dp_size(tmp_path, nproc, micro_batch, accum):
    out = _prepare(tmp_path)
    # The tiny MoE's balance losses look at each micro-batch: off, so that only the split of the
    # same 8 samples per step over ranks and micro-batches differs (float summation order).
    common = ["--set", *SMALL, f"data.source={out}", "train.steps=6", "checkpoint.every=3", "moe.aux_loss_coeff=0",
              "moe.z_loss_coeff=0"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    proc, _ = sparseforge("run", RECIPE, "--run-dir", str(straight), "--nproc-per-node", "2", *common)
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc, _ = sparseforge("run", RECIPE, "--run-dir", str(resumed), "--nproc-per-node", "2", *common,
                          "train.stop_at_step=3")
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc, _ = sparseforge("run", RECIPE, "--run-dir", str(resumed), "--nproc-per-node", str(nproc), *common,
                          f"train.micro_batch_size={micro_batch}", f"train.grad_accum_steps={accum}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed from" in proc.stdout
    want, _ = _losses(straight)
    got, _ = _losses(resumed)
    for step in range(4, 7):
        assert got[step] == pytest.approx(want[step], rel=1e-4), (step, got[step], want[step])


def test_bad_prepared_data_is_refused_before_any_rank_starts(tmp_path):
    out = _prepare(tmp_path)
    manifest = json.load(open(os.path.join(out, "manifest.json")))
    shard = manifest["splits"]["train"]["shards"][0]["file"]
    with open(os.path.join(out, shard), "r+b") as f:
        f.seek(100)
        byte = f.read(1)
        f.seek(100)
        f.write(bytes([byte[0] ^ 1]))
    empty_tok = tmp_path / "tok"
    empty_tok.mkdir()
    (empty_tok / "config.json").write_text("{}")
    for extra, message in ((["data.source=" + out], f"shard {shard} does not match its checksum"),
                           ([f"data.tokenizer={empty_tok}"], "data.tokenizer: cannot load tokenizer"),
                           ([f"data.mix={{{out}: 1.0, {tmp_path}: -1}}"], "the weight must be > 0")):
        run_dir = tmp_path / "run"
        proc, seconds = sparseforge("run", RECIPE, "--run-dir", str(run_dir), "--set", *SMALL, *extra)
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        assert proc.returncode == 2 and len(lines) == 1 and message in lines[0], proc.stderr[-2000:]
        assert not (run_dir / "config.yaml").exists()  # nothing was spawned
