"""Fault drills: run every reliability drill for real and print what each did and what happened.

    python benchmarks/fault_drills.py [--keep DIR]

Drills (tests/helpers/faults.py holds them; tests/integration/test_faults.py runs the same ones):
  reference    an uninterrupted 2-rank run of the tiny recipe (24 steps, a checkpoint every 8)
  determinism  the same command again: identical losses, bit for bit
  kill-restart --resume of the reference's step 8, train.max_restarts=1, SIGKILL of rank 1 mid-interval:
               torchrun restarts, the ranks resume from this run's latest checkpoint, final weights
               equal the reference's
  kill-save    SIGKILL of a process in the middle of writing a ~200 MB checkpoint
  corrupt      a shard of the last checkpoint cut in half: skipped with a warning, the previous used
  hang         SIGSTOP of rank 1 with parallel.timeout_s=3: rank 0 names it; torchrun ends the job
               (SIGKILL of the stopped rank after torchrun's 30 s grace)
  non-finite   optim.lr=1e30: non-finite steps skipped, the third in a row stops the run
  bad-input    bad recipes through the real CLI: one line, exit 2, nothing left running
The last line is {"drills": N, "passed": N, "lost_steps_max": ...}.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tests.helpers import faults as fh  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", default=None, help="run the drills in this directory and keep it")
    args = parser.parse_args()
    base = args.keep or tempfile.mkdtemp(prefix="sparseforge-drills-")
    os.makedirs(base, exist_ok=True)
    results, lost = [], []

    def drill(name, fn, *fn_args, **fn_kwargs):
        start = time.monotonic()
        try:
            result = fn(*fn_args, **fn_kwargs)
        except Exception as e:  # noqa: BLE001 - a drill that crashed is a failed drill, the others still run
            result = {"did": name, "result": f"drill crashed: {type(e).__name__}: {e}", "passed": False}
        seconds = time.monotonic() - start
        print(f"[{'PASS' if result['passed'] else 'FAIL'}] {name} ({seconds:.0f} s)\n    did:    {result['did']}\n"
              f"    result: {result['result']}", flush=True)
        if not result["passed"] and result.get("stderr"):
            print("    stderr (tail):\n" + "\n".join("      " + l for l in result["stderr"].splitlines()[-15:]))
        if "lost_steps" in result:
            lost.append(result["lost_steps"])
        results.append(result)
        return result

    reference = drill("reference", fh.drill_reference, base)
    if reference["passed"]:
        drill("determinism", fh.drill_determinism, base, reference)
        drill("kill-restart", fh.drill_kill_and_restart, base, reference)
        drill("corrupt", fh.drill_corrupt_checkpoint, base, reference)
    drill("kill-save", fh.drill_kill_mid_save, base)
    drill("hang", fh.drill_hang, base, timeout_s=3.0)
    drill("non-finite", fh.drill_nonfinite, base)
    drill("bad-input", fh.drill_bad_inputs, os.path.join(base, "bad"))
    if not args.keep:
        shutil.rmtree(base, ignore_errors=True)
    print(json.dumps({"drills": len(results), "passed": sum(r["passed"] for r in results),
                      "lost_steps_max": max(lost) if lost else None}))
    return 0 if all(r["passed"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
