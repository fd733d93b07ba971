"""Metrics of a run: metrics.jsonl always (the run-directory contract), wandb on top, a
progress bar on rank 0, the provenance of the run (code revision, libraries, hardware), and
steps.log: one line per step computed, never truncated, naming the attempt that computed it."""
from __future__ import annotations

import json
import math
import netrc
import os
import platform
import secrets
import subprocess
import sys
from importlib import metadata

import torch

from trainer.atomic import write_atomic
from trainer.checkpoint_files import LAUNCH_ID_ENV
from trainer.config import Config, config_to_dict

_PACKAGES = ("torch", "datasets", "wandb", "numpy", "pyyaml", "matplotlib", "deepspeed", "transformers",
             "megablocks")


def run_info() -> dict:
    """Code version, library versions and hardware, logged once at start (as modded-nanogpt)."""
    source = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        rev = subprocess.run(["git", "-C", source, "rev-parse", "HEAD"], capture_output=True,
                             text=True, timeout=5).stdout.strip() or None
        dirty = bool(subprocess.run(["git", "-C", source, "status", "--porcelain"], capture_output=True,
                                    text=True, timeout=5).stdout.strip()) if rev else None
    except (OSError, subprocess.SubprocessError):
        rev, dirty = None, None
    versions = {}
    for name in _PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return {
        "git_revision": rev, "git_dirty": dirty, "python": sys.version.split()[0], "libraries": versions,
        "platform": platform.platform(), "cpu_count": os.cpu_count(),
        "cuda_devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
        "argv": sys.argv,
    }


WANDB_MISSING = ("warning: logging.wandb=true but wandb is not installed; metrics go to metrics.jsonl only "
                 "(pip install wandb, or --set logging.wandb=false)")


def wandb_logged_in() -> bool:
    """True when an API key is configured locally; decided without touching the network."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (OSError, netrc.NetrcParseError):
        return False


STEPS_LOG = "steps.log"


def attempt_id() -> str:
    """This process's attempt at the run: the launch (one `sparseforge run`), torchrun's restart
    round within it, and this rank process (a restart after a membership change, e.g. a replacement
    node joining, does not count as a restart round, but its workers are new processes). Two
    attempts that list the same step in steps.log both computed it."""
    return (f"{os.environ.get(LAUNCH_ID_ENV, 'none')}/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"
            f"/{os.getpid()}")


def _finite(value):
    return value if not isinstance(value, float) or math.isfinite(value) else str(value)


class MetricsLogger:
    """Rank 0 writes; other ranks hold a logger that does nothing, so call sites stay plain."""

    def __init__(self, run_dir: str, cfg: Config, enabled: bool, start_step: int, total_steps: int):
        self.enabled = enabled
        self.path = os.path.join(run_dir, "metrics.jsonl")
        self._wandb = None
        self._bar = None
        self._steps = None
        if not enabled:
            return
        self._truncate_after(start_step)
        # Append-only, unlike metrics.jsonl (which a resume truncates): the work a restart redid
        # stays visible, as steps listed by two attempts (the fault drills measure it from here).
        self._steps = open(os.path.join(run_dir, STEPS_LOG), "a")
        self._attempt = attempt_id()
        info = run_info()
        with open(os.path.join(run_dir, "run_info.json"), "w") as f:
            json.dump(info, f, indent=2)
        if cfg.logging.wandb:
            self._wandb = self._start_wandb(run_dir, cfg, info)
            if self._wandb is None:
                self.print(WANDB_MISSING)
        if cfg.logging.progress_bar:
            from tqdm import tqdm

            self._bar = tqdm(total=total_steps, initial=start_step, desc="train", dynamic_ncols=True,
                             file=sys.stderr)

    def _truncate_after(self, step: int) -> None:
        """On resume, drop lines of steps that the resumed run is about to redo."""
        if not os.path.isfile(self.path):
            return
        with open(self.path) as f:
            kept = [line for line in f if line.strip() and json.loads(line).get("step", 0) <= step]
        write_atomic(self.path, lambda f: f.writelines(kept), binary=False)

    @staticmethod
    def _start_wandb(run_dir: str, cfg: Config, info: dict):
        """The wandb run, or None where wandb is not installed (a bare GPU box): the run goes on
        with metrics.jsonl, which always holds every number anyway."""
        try:
            import wandb
        except ImportError:
            return None
        mode = os.environ.get("WANDB_MODE") or ("online" if wandb_logged_in() else "offline")
        return wandb.init(project=cfg.logging.project, name=cfg.logging.run_name or None, dir=run_dir,
                          mode=mode, config={**config_to_dict(cfg), "run_info": info},
                          resume="allow", id=_wandb_id(run_dir))

    def log(self, record: dict) -> None:
        """One line of metrics.jsonl; wandb gets the numbers (lists such as the per-expert loads
        stay in the JSONL: wandb sees them as heatmap images instead)."""
        if not self.enabled:
            return
        record = {k: _finite(v) for k, v in record.items()}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self._wandb is not None:
            self._wandb.log({k: v for k, v in record.items() if k != "step" and not isinstance(v, list)},
                            step=record["step"])

    def step_done(self, step: int) -> None:
        """One line of steps.log: `step` was computed (optimizer stepped) by this attempt. Flushed
        to the kernel at once, so it survives a SIGKILL of the rank."""
        if self._steps is not None:
            self._steps.write(json.dumps({"step": step, "attempt": self._attempt}) + "\n")
            self._steps.flush()

    def log_image(self, key: str, path: str, step: int) -> None:
        """Log a PNG already written to the run directory to wandb (no-op without wandb)."""
        if self._wandb is not None:
            import wandb

            self._wandb.log({key: wandb.Image(path)}, step=step)

    def progress(self, step: int, loss: float, tokens_per_s: float) -> None:
        if self._bar is not None:
            self._bar.n = step
            self._bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tokens_per_s:,.0f}", refresh=False)
            self._bar.refresh()

    def print(self, message: str) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(message, file=sys.stderr)
        else:
            print(message, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._steps is not None:
            self._steps.close()
        if self._bar is not None:
            self._bar.close()
        if self._wandb is not None:
            self._wandb.finish()


def _wandb_id(run_dir: str) -> str:
    """A stable wandb run id per run directory, so a resumed run continues the same wandb run."""
    path = os.path.join(run_dir, "wandb_id.txt")
    if os.path.isfile(path):
        with open(path) as f:
            return f.read().strip()
    run_id = secrets.token_hex(4)
    with open(path, "w") as f:
        f.write(run_id)
    return run_id
