"""Bad input is refused before any process starts: one line on stderr, exit code 2, in well under
10 s, nothing left running. Most cases run the CLI in this process (fast); a few run it as a real
subprocess, tagged through its environment so any process it left behind would be found. The
subprocesses are timed in CPU seconds (< 10; about 0.5 without torch, 2-4 with its import), so a
busy test machine does not fail them; their wall time only has to stay under 30 s."""
import json
import os
import resource
import subprocess
import sys
import time
import uuid

import pytest

from launch.cli import main
from tests.helpers.faults import RECIPE, ROOT, TINY, cli_env, python_descendants, tagged_processes

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """Bad files and directories, and a real checkpoint of a model with d_model 64."""
    root = tmp_path_factory.mktemp("bad")
    (root / "malformed.yaml").write_text("train:\n  steps: [1, 2\n")
    (root / "empty.txt").write_text("")
    (root / "no_text").mkdir()
    (root / "no_text" / "image.png").write_bytes(b"\x89PNG")
    (root / "llama").mkdir()
    (root / "llama" / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 64}))
    (root / "dit").mkdir()
    (root / "dit" / "config.json").write_text(json.dumps({"_class_name": "DiTTransformer2DModel", "num_layers": 2}))
    (root / "a_file").write_text("not a directory")
    from trainer.recipe import load_config
    from trainer.loop import train

    run = root / "small_run"
    train(load_config(RECIPE, TINY + ["train.steps=1", "checkpoint.every=1"]), str(run))
    return root


def _cases(root):
    ckpt = f"{root}/small_run/checkpoints/step_00000001"
    return {
        "malformed YAML": ([f"{root}/malformed.yaml"], "malformed.yaml: malformed YAML (line 3)"),
        "unknown key": ([RECIPE, "--set", "model.d_modle=64"], "unknown config key model.d_modle; did you mean model.d_model?"),
        "unknown section": ([RECIPE, "--set", "trian.steps=3"], "unknown config key trian; did you mean train?"),
        "wrong type": ([RECIPE, "--set", "optim.lr=fast"], "optim.lr: expected float, got str 'fast'"),
        "wrong type list": ([RECIPE, "--set", "parallel.pp_layers=3"], "parallel.pp_layers: expected a list"),
        "zero size": ([RECIPE, "--set", "model.d_model=0"], "model.d_model: must be > 0, got 0"),
        "negative size": ([RECIPE, "--set", "train.micro_batch_size=-4"], "train.micro_batch_size: must be > 0, got -4"),
        "negative key": ([RECIPE, "--set", "train.max_restarts=-1"], "train.max_restarts: must be >= 0, got -1"),
        "layout vs world": ([RECIPE, "--nproc-per-node", "3", "--set", "parallel.pp=2"],
                            "world size 3 is not divisible by parallel.pp=2"),
        "dp vs world": ([RECIPE, "--nproc-per-node", "2", "--set", "parallel.dp=4"], "does not match world size 2"),
        "ep vs dp": ([RECIPE, "--nproc-per-node", "2", "--set", "parallel.ep=4"],
                     "parallel.ep=4 does not divide the data-parallel size 2"),
        "experts vs ep": ([RECIPE, "--nproc-per-node", "4", "--set", "parallel.ep=4", "moe.num_experts=6", "moe.top_k=2"],
                          "moe.num_experts=6 is not divisible by parallel.ep=4"),
        "missing data": ([RECIPE, "--set", f"data.source={root}/nope.txt"], "data.source: path not found"),
        "empty data file": ([RECIPE, "--set", f"data.source={root}/empty.txt"], "data.source: file is empty"),
        "no usable data": ([RECIPE, "--set", f"data.source={root}/no_text"], "data.source: no non-empty"),
        "missing tokenizer": ([RECIPE, "--set", f"data.tokenizer={root}/tok"], "data.tokenizer: path not found"),
        "peft without base": ([RECIPE, "--set", "peft.method=lora"], "peft.base: required with peft.method lora"),
        "hf dir of llama": ([RECIPE, "--set", f"model.init_from=hf:{root}/llama"], "model_type 'llama' is not supported"),
        "hf dir of a DiT": ([RECIPE, "--set", f"model.init_from=hf:{root}/dit"], "is not supported; supported: mixtral"),
        "resume other shape": ([RECIPE, "--resume", ckpt], f"--resume: {ckpt} was saved with model.d_model=64, this "
                                                           f"run has model.d_model=128: it cannot resume"),
        "run dir other shape": ([RECIPE, "--set", *TINY, "model.num_layers=3"],
                                "the run directory's latest checkpoint", f"{root}/small_run"),
        "resume missing": ([RECIPE, "--resume", f"{root}/step_00000009"], "--resume: checkpoint directory not found"),
        "run dir is a file": ([RECIPE], "is not writable", f"{root}/a_file/run"),
        "offload on cpu": ([RECIPE, "--set", "parallel.data_parallel=fsdp", "parallel.fsdp_cpu_offload=true",
                            "train.device=cpu"], "parallel.fsdp_cpu_offload: moves FSDP's shards from a GPU"),
        "offload, auto device, no GPU": ([RECIPE, "--set", "parallel.data_parallel=fsdp",
                                          "parallel.fsdp_cpu_offload=true"], "this run computes on the CPU"),
        "dp_shard vs dp": ([RECIPE, "--nproc-per-node", "4", "--set", "parallel.data_parallel=fsdp",
                            "parallel.dp_shard=3"], "parallel.dp_shard=3 does not divide the data-parallel size 4"),
        "esft with fsdp": ([RECIPE, "--set", "parallel.data_parallel=fsdp", "peft.method=esft",
                            f"peft.base={ckpt}", *TINY], "peft.method=esft: not with parallel.data_parallel=fsdp"),
    }


CASES = ["malformed YAML", "unknown key", "unknown section", "wrong type", "wrong type list", "zero size",
         "negative size", "negative key", "layout vs world", "dp vs world", "ep vs dp", "experts vs ep",
         "missing data", "empty data file", "no usable data", "missing tokenizer", "peft without base",
         "hf dir of llama", "hf dir of a DiT", "resume other shape", "run dir other shape", "resume missing",
         "run dir is a file", "offload on cpu", "offload, auto device, no GPU", "dp_shard vs dp", "esft with fsdp"]


def _argv(root, tmp_path, case):
    args, message, *run_dir = _cases(root)[case]
    return ["run", *args, "--run-dir", run_dir[0] if run_dir else str(tmp_path / "run")], message


@pytest.mark.parametrize("case", CASES)
def test_refused_in_process(inputs, tmp_path, capfd, case):
    if case == "offload, auto device, no GPU":
        import torch

        if torch.cuda.is_available():
            pytest.skip("train.device=auto resolves to the GPU here")
    argv, message = _argv(inputs, tmp_path, case)
    before = {p.pid for p in python_descendants()}
    start = time.perf_counter()
    code = main(argv)
    seconds = time.perf_counter() - start
    out, err = capfd.readouterr()
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, (case, err)
    assert len(lines) == 1 and lines[0].startswith("sparseforge: error: ") and message in lines[0], lines
    assert seconds < 10, seconds
    assert {p.pid for p in python_descendants()} <= before  # nothing was spawned
    assert not os.path.exists(tmp_path / "run" / "config.yaml")


@pytest.mark.parametrize("case", ["malformed YAML", "layout vs world", "missing data", "hf dir of llama",
                                  "resume other shape"])
def test_refused_by_the_real_cli(inputs, tmp_path, case):
    argv, message = _argv(inputs, tmp_path, case)
    tag = uuid.uuid4().hex
    start, before = time.perf_counter(), resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = subprocess.run([sys.executable, "-m", "launch.cli", *argv], capture_output=True, text=True,
                          env=cli_env(FAULT_DRILL_TAG=tag), cwd=ROOT, timeout=60)
    seconds, after = time.perf_counter() - start, resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu_seconds = after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1 and message in lines[0], lines
    assert cpu_seconds < 10 and seconds < 30, (cpu_seconds, seconds)
    assert tagged_processes(tag) == []


def test_no_room_for_two_checkpoints(tmp_path, capfd, monkeypatch):
    """The run directory must hold two checkpoints (a save writes the new one beside the last)."""
    import shutil
    from collections import namedtuple

    free = 300 * 2**20
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10 * free, 9 * free, free))
    code = main(["run", RECIPE, "--set", "model.d_model=1024", "--run-dir", str(tmp_path / "run")])
    lines = [line for line in capfd.readouterr().err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1, lines
    assert "has only 300 MiB free (needs at least" in lines[0]
    assert "a checkpoint of this model takes ~" in lines[0] and "a save needs room for two" in lines[0]
    # Without checkpoints the 256 MiB floor for config and metrics is all it needs.
    from launch.preflight import check_run_dir

    check_run_dir(str(tmp_path / "run"))
