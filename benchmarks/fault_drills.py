"""Fault drills: run every reliability drill for real and print what each did and what happened.

    python benchmarks/fault_drills.py [--keep DIR]

Drills (tests/helpers/faults.py holds them; tests/integration/test_faults.py runs the same ones):
  reference    an uninterrupted 2-rank run of the tiny recipe (24 steps, a checkpoint every 8)
  determinism  the same command again: identical losses, bit for bit
  kill-restart --resume of the reference's step 8, train.max_restarts=3, SIGKILL of rank 1 at 3 steps
               drawn with random.Random(0): torchrun restarts, the ranks resume from this launch's
               newest checkpoint, final weights equal the reference's; the steps computed twice per
               kill are read from the run's steps.log (at most one checkpoint interval each)
  corrupt      a shard of the last checkpoint cut in half: skipped with a warning, the previous used;
               `sparseforge run --resume` of it: one line naming the file, exit 2, nothing spawned
  hang         SIGSTOP of rank 1 with parallel.timeout_s=3, never continued: rank 0 names it;
               torchrun ends the job (SIGKILL of the stopped rank after torchrun's 30 s grace)
  non-finite   optim.lr=1e30: non-finite steps skipped, the third in a row stops the run
  bad-input    bad recipes through the real CLI: one line, exit 2, nothing left running
  async-vs-sync  the same 2-rank run saving synchronously and in the background: the same tensors
  kill-async   SIGKILL of every rank while a background write is in flight: the previous
               checkpoint stays the latest, the rerun resumes from it with the reference's losses
  kill-save    SIGKILL of rank 1 of 2 while a synchronous save of a ~100 MB checkpoint is written:
               never published nor chosen, the rerun resumes from the previous one with the
               reference's losses
  full-disk    the disk filled after a checkpoint: the next save fails in one line naming the path
               and the bytes, its partial directory removed; stop (then resume once there is room)
               or, with checkpoint.on_error=skip, train on (needs root for a size-limited tmpfs)
  lost-node    2 namespace hosts, host 1 killed and cut off mid-run: torchrun's restart and a
               replacement host resume from the last checkpoint; losses equal a one-node run's
  save stall   the time a save blocks the step loop, synchronous vs background (one process,
               a ~45 MB checkpoint; target: async <= 20% of sync)
The last line is {"drills": N, "passed": N, "redone_steps": {drill: [steps computed twice, per kill]},
"redone_steps_spread": {"min": .., "median": .., "max": ..}, "lost_node_recovered_s": ...,
"save_stall_ms": {"sync": .., "async": ..}, "async_stall_vs_sync": .., "checkpoint_mb": ..}.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tests.helpers import faults as fh  # noqa: E402
from tests.helpers import reliability_drills as rd  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", default=None, help="run the drills in this directory and keep it")
    args = parser.parse_args()
    base = args.keep or tempfile.mkdtemp(prefix="sparseforge-drills-")
    os.makedirs(base, exist_ok=True)
    results, redone = [], {}  # {drill: steps computed twice per kill, read from its run's steps.log}

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
        if "redone_steps" in result:
            redone[name] = result["redone_steps"]
        results.append(result)
        return result

    reference = drill("reference", fh.drill_reference, base)
    if reference["passed"]:
        drill("determinism", fh.drill_determinism, base, reference)
        drill("kill-restart", fh.drill_kill_and_restart, base, reference)
        drill("corrupt", fh.drill_corrupt_checkpoint, base, reference)
    drill("hang", fh.drill_hang, base, timeout_s=3.0)
    drill("non-finite", fh.drill_nonfinite, base)
    drill("bad-input", fh.drill_bad_inputs, os.path.join(base, "bad"))
    pair = drill("async-vs-sync", rd.drill_async_equals_sync, os.path.join(base, "async"))
    if pair["passed"]:
        drill("kill-async", rd.drill_kill_during_background_write, os.path.join(base, "async"), pair)
        drill("kill-save", rd.drill_kill_mid_save_ranks, os.path.join(base, "async"), pair)
    if rd.full_disk_unavailable() is None:
        drill("full-disk", rd.drill_full_disk, os.path.join(base, "disk"), "stop")
        drill("full-disk-skip", rd.drill_full_disk, os.path.join(base, "disk"), "skip")
    else:
        print(f"[SKIP] full-disk: {rd.full_disk_unavailable()}")
    lost_node = drill("lost-node", rd.drill_lost_node, os.path.join(base, "node"))
    stall = rd.measure_save_stall()
    print(f"save stall: sync {1e3 * stall['sync']['stall_s']:.0f} ms, async {1e3 * stall['async']['stall_s']:.0f} ms "
          f"(x{stall['async_vs_sync']:.2f}) per save of a {stall['sync']['checkpoint_mb']:.0f} MB checkpoint; "
          f"a step takes {1e3 * stall['sync']['step_s']:.0f} ms", flush=True)
    if not args.keep:
        shutil.rmtree(base, ignore_errors=True)
    print(json.dumps({"drills": len(results), "passed": sum(r["passed"] for r in results),
                      "redone_steps": redone, "redone_steps_spread": _spread(sum(redone.values(), [])),
                      "lost_node_recovered_s": round(lost_node.get("recovered_s", 0), 1),
                      "save_stall_ms": {"sync": round(1e3 * stall["sync"]["stall_s"], 1),
                                        "async": round(1e3 * stall["async"]["stall_s"], 1)},
                      "async_stall_vs_sync": round(stall["async_vs_sync"], 3),
                      "checkpoint_mb": round(stall["sync"]["checkpoint_mb"], 1)}))
    return 0 if all(r["passed"] for r in results) else 1


def _spread(values: list[int]) -> dict:
    if not values:
        return {"min": None, "median": None, "max": None}
    return {"min": min(values), "median": statistics.median(values), "max": max(values)}


if __name__ == "__main__":
    sys.exit(main())
