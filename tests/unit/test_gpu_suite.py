"""benchmarks/gpu_suite.py stays runnable without a GPU: its --cpu-smoke run goes through every
part (parity, MoE layer, DiT and LLM training steps with each checkpointing mode, compiled and
not) and reports them; the parity check fails a kernel that computes the wrong thing."""
import json
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import _gpu_parity  # noqa: E402


def test_cpu_smoke_runs_every_part(tmp_path):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "gpu_suite.py"), "--cpu-smoke",
                          "--out", str(tmp_path)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    assert summary == json.loads((tmp_path / "gpu_suite.json").read_text())
    assert "] done" in (tmp_path / "gpu_suite.log").read_text()
    assert set(summary) == {"device", "torch", "parity", "moe_layer", "llm", "dit", "elapsed_s"}
    assert summary["device"] == "cpu" and summary["torch"] == torch.__version__

    parity = summary["parity"]
    assert parity["ok"] and {(e["backend"], e["dtype"]) for e in parity["entries"]} >= {
        ("loop", "float32"), ("loop", "bfloat16")}
    assert all(e["status"] == "pass" and e["idle_grads_zero"] for e in parity["entries"] if e["backend"] == "loop")

    for row in summary["moe_layer"]:
        assert {"ours_grouped_mm", "ours_loop", "dense"} <= set(row["ms"]) and row["ours"] == "loop"
        assert row["ours_over_dense"] > 0 and set(row["targets"]) >= {"faster_than_hf"}
        assert all(diff < 1e-4 for diff in row["max_abs_vs_ours"].values())  # the same function

    llm = summary["llm"]
    assert set(llm["runs"]) == {"none", "block", "moe_ffn"} and llm["best"]["tokens_per_s"] > 0
    for mode, run in llm["runs"].items():
        assert run["expert_backend"] == "grouped_mm", mode  # the GPU's expert path, compiled too
        for phase in ("eager", "compiled"):
            assert run[phase]["tokens_per_s"] > 0 and run[phase]["plan_memory_gib"] > 0, (mode, phase)
            assert run[phase]["mfu"] is None  # no peak rate is known for a CPU
    # every block compiled whole, or around its checkpointed experts (4 blocks x 5 parts)
    assert [llm["runs"][m]["compiled_modules"] for m in ("none", "block", "moe_ffn")] == [4, 4, 20]
    assert summary["dit"]["eager"]["samples_per_s"] > 0 and summary["dit"]["compiled"]["samples_per_s"] > 0


def _broken(expert: int, factor: float):
    """The grouped-GEMM backend with one expert's output scaled by `factor` (a wrong kernel)."""
    real = _gpu_parity.BACKENDS["grouped_mm"]

    def backend(x, counts, *ws):
        y = real(x, counts, *ws)
        start = int(counts[:expert].sum())
        scale = torch.ones(y.shape[0], 1, dtype=y.dtype)
        scale[start:start + int(counts[expert])] = factor
        return y * scale

    return backend


def test_parity_fails_a_wrong_kernel_and_one_that_must_run_but_raises(monkeypatch):
    log = []
    # 3% off on one of 8 experts: 0.4% of the whole output, which a whole-tensor norm would pass
    monkeypatch.setitem(_gpu_parity.BACKENDS, "grouped_mm", _broken(expert=3, factor=1.03))
    result = _gpu_parity.run_parity(torch.device("cpu"), smoke=True, log=log.append)
    status = {(e["backend"], e["dtype"]): e["status"] for e in result["entries"]}
    assert not result["ok"] and status == {("loop", "float32"): "pass", ("grouped_mm", "float32"): "fail",
                                           ("loop", "bfloat16"): "pass", ("grouped_mm", "bfloat16"): "fail"}
    assert any("grouped_mm" in line and "fail" in line for line in log)

    def raises(*args):
        raise RuntimeError("no kernel for this")

    monkeypatch.setitem(_gpu_parity.BACKENDS, "grouped_mm", raises)
    monkeypatch.setitem(_gpu_parity.BACKENDS, "loop", raises)
    result = _gpu_parity.run_parity(torch.device("cpu"), smoke=True, log=log.append)
    status = {e["backend"]: e["status"] for e in result["entries"]}
    assert status == {"loop": "fail", "grouped_mm": "unsupported"} and not result["ok"]  # optional on a CPU


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_parity_reference_is_the_loop_backend_in_float64(dtype):
    case = _gpu_parity.cases(smoke=True)[0]
    x, ws, dy, counts = _gpu_parity.make_inputs(case, torch.device("cpu"), dtype, seed=3)
    got = _gpu_parity.run_backend("loop", x.double(), [w.double() for w in ws], dy.double(), counts)
    verdict = _gpu_parity.compare(got, _gpu_parity.reference(x, ws, dy, case["counts"]), case["counts"], 1e-12)
    assert verdict["status"] == "pass" and max(verdict["rel_err"].values()) < 1e-12


def test_parity_fails_a_kernel_with_nan_in_one_expert():
    """A NaN in the rows of one busy expert (not the first) fails: Python's max() would drop it."""
    case = _gpu_parity.cases(smoke=True)[0]
    x, ws, dy, counts = _gpu_parity.make_inputs(case, torch.device("cpu"), torch.float32, seed=0)
    want = _gpu_parity.reference(x, ws, dy, case["counts"])
    got = _gpu_parity.run_backend("loop", x, ws, dy, counts)
    assert _gpu_parity.compare(got, want, case["counts"], 1e-3)["status"] == "pass"
    start = sum(case["counts"][:5])
    got[0][start:start + case["counts"][5]] = float("nan")  # expert 5's rows of y
    verdict = _gpu_parity.compare(got, want, case["counts"], 1e-3)
    assert verdict["status"] == "fail" and verdict["rel_err"]["y"] != verdict["rel_err"]["y"]


def test_profiled_run_with_overrides_and_the_layer_profile(tmp_path):
    """--set reaches the runs' config (here AdamW's kernels), --profile appends a kernel table per
    training run, and benchmarks/gpu_moe_profile.py times its variants (equal outputs) on the CPU."""
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    run = lambda *args: subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                                       timeout=300)
    out = run(os.path.join(ROOT, "benchmarks", "gpu_suite.py"), "--cpu-smoke", "--parts", "llm", "--llm-modes",
              "none", "--set", "optim.implementation=for_loop", "--profile", "--out", str(tmp_path))
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "for_loop" in (tmp_path / "gpu_suite.log").read_text()
    assert (tmp_path / "profiles.txt").read_text().count("== tiny none compiled") == 1
    assert run(os.path.join(ROOT, "benchmarks", "gpu_suite.py"), "--cpu-smoke", "--set", "oops").returncode == 2
    out = run(os.path.join(ROOT, "benchmarks", "gpu_moe_profile.py"), "--cpu-smoke", "--out", str(tmp_path))
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    report = json.loads((tmp_path / "moe_profile.json").read_text())
    for row in report["shapes"]:
        assert set(row["ms"]) >= {"grouped_mm", "grouped_composed", "loop", "dense"}
        assert max(row["max_abs_vs_grouped_mm"][n] for n in ("grouped_composed", "loop")) < 1e-4
    assert report["sweep"] and "== loop E=8" in (tmp_path / "profiles.txt").read_text()
