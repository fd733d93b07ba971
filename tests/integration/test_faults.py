"""Fault drills with real processes and signals (tests/helpers/faults.py runs them; so does
benchmarks/fault_drills.py): a rank SIGKILLed at seeded random steps, a corrupt checkpoint (and
`--resume` of it through the CLI), a SIGSTOPped rank that stays stopped, and determinism. One
uninterrupted 2-rank run is the reference. A save SIGKILLed midway on real ranks:
tests/integration/test_reliability.py."""
import os

import pytest

from tests.helpers import faults as fh

pytestmark = pytest.mark.integration


def _check(result):
    details = {k: v for k, v in result.items() if k != "stderr"}
    assert result["passed"], f"{details}\n{result.get('stderr', '')}"


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    result = fh.drill_reference(str(tmp_path_factory.mktemp("drills")))
    _check(result)
    return result


def test_same_seed_and_layout_give_identical_losses(reference, tmp_path):
    result = fh.drill_determinism(str(tmp_path), reference)
    _check(result)
    assert result["differing_steps"] == []


def test_killed_rank_restarts_and_resumes_from_its_last_checkpoint(reference, tmp_path):
    """--resume of the reference's step-8 checkpoint, rank 1 SIGKILLed at 3 seeded random steps:
    each restart resumes from this launch's newest checkpoint (--resume's until it saved one), the
    steps computed twice (read from the run's steps.log) are at most one checkpoint interval per
    kill, and the run ends with the uninterrupted run's weights."""
    result = fh.drill_kill_and_restart(str(tmp_path), reference, seed=0, num_kills=3)
    _check(result)
    assert result["resumed"][0].startswith(f"resumed from {fh.checkpoint_dir(reference['run_dir'], 8)} at step 8")
    assert len(result["redone_steps"]) == 3 and max(result["redone_steps"]) <= fh.EVERY, result["redone_steps"]
    assert result["max_weight_diff"] <= 1e-6


def test_corrupt_checkpoint_is_skipped_and_the_previous_one_resumed(reference, tmp_path, capsys):
    result = fh.drill_corrupt_checkpoint(str(tmp_path), reference)
    _check(result)
    # --resume of it through the CLI: one line naming the checkpoint and the shard, exit 2.
    assert result["cli_exit"] == 2 and len(result["cli_stderr"]) == 1, result["cli_stderr"]
    assert "is not a complete checkpoint: __0_0.distcp has" in result["cli_stderr"][0]
    assert result["changed_files"] == []
    # A resume in this process (1 rank with the 2 ranks' global batch) loads the step-16 one.
    from trainer.recipe import load_config
    from trainer.loop import Trainer

    run_dir = os.path.join(str(tmp_path), "corrupt")
    cfg = load_config(fh.RECIPE, fh.TINY + [f"train.steps={fh.STEPS}", "train.micro_batch_size=8"])
    trainer = Trainer(cfg, run_dir)
    assert trainer.step == fh.STEPS - fh.EVERY
    assert f"resumed from {fh.checkpoint_dir(run_dir, fh.STEPS - fh.EVERY)}" in capsys.readouterr().out


def test_stopped_rank_is_named_and_the_job_ends_though_it_stays_stopped(tmp_path):
    """Rank 1 SIGSTOPped and never continued: rank 0 names it within the timeout, and torchrun's
    teardown (SIGTERM, left pending by the stop, then SIGKILL after its 30 s grace) ends the job
    within fh.hang_end_bound (3 + 6 + 30 + 15 = 54 s after the stop), no process of it left."""
    result = fh.drill_hang(str(tmp_path), timeout_s=3.0)
    _check(result)
    # Rank 1 stops somewhere in a step: rank 0 then waits in that step's gradient all-reduce, or
    # (rank 1 stopped just after it) in the per-step metrics all-reduce (train.log_every=1).
    line = result["error_line"]
    assert "collective failed at step" in line
    assert "in 'train step'" in line or "in 'metrics (router statistics over dp)'" in line, line
    assert result["exit"] != 0 and result["ended_s"] <= fh.hang_end_bound(3.0), result["ended_s"]
