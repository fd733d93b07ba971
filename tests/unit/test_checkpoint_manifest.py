"""Checkpoint completeness from manifest.json, and which checkpoint a (re)started rank resumes from."""
import json
import os

import pytest

from trainer.checkpoint_files import LAUNCH_ID_ENV, checkpoint_problem, choose_resume, latest_checkpoint, prune_checkpoints as _prune


def _fake_checkpoint(run_dir, step, launch=None, manifest=True):
    """The files a checkpoint directory holds (contents do not matter here) and its manifest."""
    path = os.path.join(run_dir, "checkpoints", f"step_{step:08d}")
    os.makedirs(path)
    for name, size in ((".metadata", 10), ("__0_0.distcp", 100), ("extra_rank0.pt", 20)):
        with open(os.path.join(path, name), "wb") as f:
            f.write(b"x" * size)
    if manifest:
        files = {n: os.path.getsize(os.path.join(path, n)) for n in os.listdir(path)}
        with open(os.path.join(path, "manifest.json"), "w") as f:
            json.dump({"step": step, "launch_id": launch, "files": files}, f)
    return path


def test_manifest_detects_missing_and_truncated_files(tmp_path, capfd):
    good = _fake_checkpoint(tmp_path, 1)
    legacy = _fake_checkpoint(tmp_path, 2, manifest=False)  # written before manifests: the old checks
    cut = _fake_checkpoint(tmp_path, 3)
    gone = _fake_checkpoint(tmp_path, 4)
    with open(os.path.join(cut, "__0_0.distcp"), "r+b") as f:
        f.truncate(40)
    os.remove(os.path.join(gone, "__0_0.distcp"))
    assert checkpoint_problem(good) is None and checkpoint_problem(legacy) is None
    assert checkpoint_problem(cut) == "__0_0.distcp has 40 bytes, manifest.json says 100"
    assert checkpoint_problem(gone) == "__0_0.distcp is missing"
    with open(os.path.join(good, "manifest.json"), "w") as f:
        f.write("{not json")
    assert checkpoint_problem(good) == "manifest.json is unreadable"
    assert latest_checkpoint(str(tmp_path)) == legacy
    err = capfd.readouterr().err
    for path, reason in ((cut, "__0_0.distcp has 40 bytes, manifest.json says 100"), (gone, "__0_0.distcp is missing"),
                         (good, "manifest.json is unreadable")):
        assert f"warning: checkpoint {path} is incomplete or corrupt ({reason}); skipped" in err
    latest_checkpoint(str(tmp_path))
    assert capfd.readouterr().err == ""  # once per checkpoint and process


@pytest.mark.parametrize("env, expected", [
    ({}, "given"),  # a first start: --resume
    ({LAUNCH_ID_ENV: "this"}, 12),  # a restart of this launch: its own newest (not the older trajectory's 16)
    ({LAUNCH_ID_ENV: "other"}, "given"),  # a new launch that has not saved yet
    ({"TORCHELASTIC_RESTART_COUNT": "1"}, 16),  # torchrun by hand, restarted: the newest beyond --resume
    ({"TORCHELASTIC_RESTART_COUNT": "0"}, "given"),
])
def test_resume_choice(tmp_path, monkeypatch, env, expected):
    given = _fake_checkpoint(tmp_path / "elsewhere", 4)
    _fake_checkpoint(tmp_path, 16, launch="before")  # an abandoned, longer trajectory
    _fake_checkpoint(tmp_path, 8, launch="this")
    _fake_checkpoint(tmp_path, 12, launch="this")
    for name in (LAUNCH_ID_ENV, "TORCHELASTIC_RESTART_COUNT"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    chosen = choose_resume(str(tmp_path), given)
    assert chosen == (given if expected == "given" else os.path.join(tmp_path, "checkpoints", f"step_{expected:08d}"))
    assert choose_resume(str(tmp_path), None) == os.path.join(tmp_path, "checkpoints", "step_00000016")


def _age(path, seconds_ago):
    """Set a fake checkpoint's write time (its manifest's mtime) to `seconds_ago`."""
    stamp = os.stat(path).st_mtime - seconds_ago
    os.utime(os.path.join(path, "manifest.json"), (stamp, stamp))


def test_keep_last_prunes_by_write_order_after_a_rollback(tmp_path):
    # Steps 10, 20, 30 were saved in that order; then --resume went back to 10 and the new
    # trajectory has just saved step 20 again (newest written, but not the highest step).
    ckpt = {step: _fake_checkpoint(tmp_path, step) for step in (10, 30)}
    for step, ago in ((10, 300), (30, 100)):
        _age(ckpt[step], ago)
    new_20 = _fake_checkpoint(tmp_path, 20)
    _prune(str(tmp_path), 2, just_saved=new_20)
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["step_00000020", "step_00000030"]
    _prune(str(tmp_path), 1, just_saved=new_20)  # step order would keep the abandoned step 30
    assert os.listdir(tmp_path / "checkpoints") == ["step_00000020"]
    # Equal write times (a coarse clock): the step breaks the tie, the one just saved stays.
    a, b = _fake_checkpoint(tmp_path / "tie", 1), _fake_checkpoint(tmp_path / "tie", 2)
    for path in (a, b):
        os.utime(os.path.join(path, "manifest.json"), (1_000_000, 1_000_000))
    _prune(str(tmp_path / "tie"), 1, just_saved=a)
    assert sorted(os.listdir(tmp_path / "tie" / "checkpoints")) == ["step_00000001", "step_00000002"]
    _prune(str(tmp_path / "tie"), 1)
    assert os.listdir(tmp_path / "tie" / "checkpoints") == ["step_00000002"]
