"""The training loop that runs on every rank: construct (trainer/build.py), resume, then train,
evaluate and checkpoint until train.steps."""
from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass

import torch

from parallel import ParallelMesh, all_reduce_mean, build_mesh, pick_device, unwrap
from parallel.watchdog import Watchdog
from trainer.build import construct, trains_aux_free_bias
from trainer.checkpoint import load_checkpoint, resume_point, save_checkpoint
from trainer.checkpoint_save import PendingSave, SaveFailed
from trainer.checkpoint_files import latest_checkpoint
from trainer.config import Config
from trainer.guards import CollapseMonitor, NonFiniteGuard
from trainer.metrics import MetricsLogger
from trainer.router_stats import RouterStats
from trainer.step import Stepper
from trainer.tasks import build_task


@dataclass
class TrainResult:
    final_step: int
    final_val_loss: float | None
    unigram_entropy_nats: float | None  # LM runs: the corpus's unigram entropy, a reference loss
    final_eval: dict | None = None  # the last family-specific evaluation (DiT: eval/acc, eval/fd)


class Trainer:
    """Holds the live objects of one run on one rank. `run()` does the whole job."""

    def __init__(self, cfg: Config, run_dir: str, resume_from: str | None = None, task=None):
        """`task`: what to train on instead of the family's data (trainer/lm/task.py describes the
        interface; benchmarks pass synthetic batches, with `data` None when `run` is not called)."""
        if cfg.prune.method != "none" and (resume_from or latest_checkpoint(run_dir)):
            # A prune run that already compressed: train on from its checkpoints, with their shapes.
            from trainer.adapt.prune import resumed_prune_config

            cfg = resumed_prune_config(cfg, resume_from or latest_checkpoint(run_dir))
        self.run_dir, self.device = run_dir, pick_device(cfg.train.device)
        self.mesh: ParallelMesh = build_mesh(cfg.parallel, self.device)
        # Heartbeats, so a failed collective names the ranks that did not arrive (parallel/watchdog.py).
        self.watchdog = Watchdog.start(self.mesh.rank, self.mesh.world_size, cfg.parallel.timeout_s)
        self.pending_save: PendingSave | None = None  # a checkpoint being written in the background
        # Data, loss and evaluation of the family.
        self.task = build_task(cfg, self.mesh, self.device) if task is None else task
        self.data = self.task.data
        resume_path = resume_point(run_dir, resume_from)  # a torchrun restart: this launch's newest
        built = construct(cfg, self.mesh, self.task, run_dir, resume_path)  # trainer/build.py, step by step
        self.cfg = cfg = built.cfg
        self.prune, self.peft, self.param_counts = built.prune, built.peft, built.param_counts
        self.model, self.pipeline = built.parts.model, built.parts.pipeline
        opt = built.optimization
        self.optimizer, self.scheduler, self.engine, self.ema = opt.optimizer, opt.scheduler, opt.engine, opt.ema
        # Per-rank RNG stream from here on (dropout, jitter), reproducible and resumable.
        torch.manual_seed(cfg.train.seed + 1 + self.mesh.rank)
        if self.mesh.is_main:
            for line in built.lines:
                print(line, flush=True)
        self.step = self._resume(resume_path)
        # The heatmap reads the whole model's layers: under pp every rank joins its gather.
        heatmap_every = cfg.logging.heatmap_every if cfg.moe.num_experts > 0 else 0
        self.router = RouterStats(self.model, self.mesh, trains_aux_free_bias(self.unwrapped_model, cfg), heatmap_every,
                                  cfg.logging.expert_loads)
        self.guard = NonFiniteGuard(cfg.train.max_nonfinite_steps)  # trainer/guards.py
        self.collapse = CollapseMonitor.from_config(cfg)
        self.autocast = torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=cfg.train.dtype == "bf16")
        self.stepper = Stepper(self.model, self.mesh, self.task, self.optimizer, self.scheduler, self.guard,
                               self.router, cfg.train.grad_accum_steps, cfg.optim.grad_clip, self.autocast,
                               self.ema, self.pipeline, self.engine)

    @property
    def unwrapped_model(self):
        return unwrap(self.model)

    def extra_state(self) -> dict:
        return {"ema": self.ema.state_dict()} if self.ema is not None else {}

    def run_state(self) -> dict:
        """Saved with each checkpoint and read before the model is built on resume."""
        if self.peft is not None and self.peft.esft_selection is not None:
            return {"esft_selection": self.peft.esft_selection}
        return {}

    def _resume(self, path: str | None) -> int:
        if path is None:
            return 0
        step = load_checkpoint(path, self.model, self.optimizer, self.scheduler, self.data, self.mesh,
                               extra_state=self.extra_state(), engine=self.engine)
        if self.mesh.is_main:
            print(f"resumed from {path} at step {step}", flush=True)
        return step

    def run(self) -> TrainResult:
        cfg, mesh = self.cfg, self.mesh
        log = MetricsLogger(self.run_dir, cfg, mesh.is_main, self.step, cfg.train.steps)
        total, active = self.param_counts
        log.print(f"params: {total:,} total, {active:,} active per token; world size {mesh.world_size}; "
                  f"{self.task.describe_data()}")
        if self.peft is not None and self.step == 0:  # once per run (a resume keeps the line)
            log.log({"step": 0, **self.peft.metrics()})
        batches = self.data.train_batches()
        tokens_per_step = self.task.tokens_per_micro_batch * cfg.train.grad_accum_steps * mesh.dp
        final_eval = None
        # Throughput counts training steps only: eval, checkpoints and plots stay out of it.
        window_seconds, window_steps = 0.0, 0
        val_loss = None
        if self.prune is not None:  # step 0: the compressed model's checkpoint and report
            from trainer.adapt.prune import finish_prune

            val_loss, final_eval = finish_prune(self, log)
        try:
            while self.step < cfg.train.steps:
                step_start = time.perf_counter()
                self.watchdog.mark(self.step + 1, "train step")
                loss, grad_norm = self.stepper(batches, self.step + 1)
                window_seconds += time.perf_counter() - step_start
                self.step += 1
                window_steps += 1
                log.step_done(self.step)
                if self.step % cfg.train.log_every == 0 or self.step == cfg.train.steps:
                    tokens_per_s = tokens_per_step * window_steps / max(window_seconds, 1e-9)
                    record = {"step": self.step, "loss": loss, "lr": self.scheduler.get_last_lr()[0],
                              "grad_norm": grad_norm, "tokens_per_s": tokens_per_s}
                    self.watchdog.mark(self.step, "metrics (router statistics over dp)")
                    record.update(self.router.collect())
                    record.update(self._task_metrics())
                    record.update(self.guard.pop_metrics())
                    for warning in self.collapse.update(self.step, record):
                        log.print(warning)
                    log.log(record)
                    log.progress(self.step, loss, tokens_per_s)
                    window_seconds, window_steps = 0.0, 0
                if self.router.heatmap_every and self.step % self.router.heatmap_every == 0:
                    self._expert_load_heatmap(log)
                evaluate_now = cfg.eval.every and self.step % cfg.eval.every == 0
                if evaluate_now or self.step == cfg.train.steps:
                    self.watchdog.mark(self.step, "evaluation")
                    val_loss, final_eval = self._evaluate(log)
                stopping = cfg.train.stop_at_step and self.step == cfg.train.stop_at_step
                if cfg.checkpoint.enabled and (self.step % cfg.checkpoint.every == 0
                                               or self.step == cfg.train.steps or stopping):
                    self._save(log)
                if stopping:
                    log.print(f"stopping at step {self.step} (train.stop_at_step); rerun to resume")
                    break
            self._wait_for_save(log)  # the run ends once its last checkpoint is published
        except Exception as error:
            explained = self.watchdog.explain(error)  # a failed collective: who did not arrive
            if explained is not None:
                raise explained from error
            raise
        finally:
            self.watchdog.stop()
            log.close()
        if val_loss is not None and mesh.is_main:
            print(self.task.final_line(self.step, val_loss, final_eval or {}), flush=True)
        return TrainResult(self.step, val_loss, self.task.reference_loss, final_eval)

    def _save(self, log: MetricsLogger) -> None:
        """A checkpoint of this step: synchronous, or in the background (checkpoint.async_save)
        after the previous background save is published (at most one in flight)."""
        self._wait_for_save(log)
        self.watchdog.mark(self.step, "checkpoint save")
        try:
            saved = save_checkpoint(self.run_dir, self.step, self.model, self.optimizer, self.scheduler, self.data,
                                    self.cfg, self.mesh, extra_state=self.extra_state(), run_state=self.run_state(),
                                    engine=self.engine, background=self.cfg.checkpoint.async_save)
        except SaveFailed as e:
            self._save_failed(e, log)
            return
        if isinstance(saved, PendingSave):
            self.pending_save = saved

    def _wait_for_save(self, log: MetricsLogger) -> None:
        pending, self.pending_save = self.pending_save, None
        if pending is not None:
            self.watchdog.mark(self.step, f"checkpoint save of step {pending.step} (background)")
            try:
                pending.wait()
            except SaveFailed as e:
                self._save_failed(e, log)

    def _save_failed(self, error: SaveFailed, log: MetricsLogger) -> None:
        if self.cfg.checkpoint.on_error == "stop":
            raise error
        log.print(f"warning: {error}; training on (checkpoint.on_error=skip)")

    def _task_metrics(self) -> dict:
        """The task's own per-step metrics (DiT: diffusion/mse, diffusion/vlb), mean over dp."""
        metrics = self.task.pop_metrics()
        if not metrics:
            return {}
        keys = sorted(metrics)
        values = all_reduce_mean(torch.tensor([metrics[k] for k in keys], dtype=torch.float64,
                                              device=self.device), self.mesh.dp_group)
        return dict(zip(keys, values.tolist()))

    def _expert_load_heatmap(self, log: MetricsLogger) -> None:
        """Plot the loads routed since the previous heatmap, summed over dp ranks (collective);
        rank 0 writes RUN_DIR/plots/expert_load_step_XXXXXXXX.png."""
        loads_LE = self.router.heatmap_loads()
        if loads_LE is not None and self.mesh.is_main:
            from trainer.plots import save_expert_load_heatmap

            path = save_expert_load_heatmap(loads_LE.cpu(), self.step, self.run_dir)
            log.log_image("moe/expert_load", path, self.step)

    @torch.no_grad()
    def _evaluate(self, log: MetricsLogger) -> tuple[float, dict]:
        """Validation loss (logged as eval/loss), then the task's own evaluation."""
        model = unwrap(self.model)
        model.eval()
        losses = []
        for index, batch in enumerate(self.data.val_batches(self.cfg.eval.batches)):
            batch = self.task.to_device(batch)
            with self.autocast:
                if self.pipeline is None:
                    losses.append(self.task.eval_loss(model, batch, index))
                elif (loss := self.pipeline.eval_loss(*self.task.pipeline_args(batch, eval_index=index))) is not None:
                    losses.append(loss)  # on the last stage's rank only
        self.router.discard()  # eval routing is not training routing; keep the stats clean
        mean = torch.stack(losses).mean() if losses else None
        if self.pipeline is not None:
            mean = self.pipeline.broadcast_from_last(mean, self.device)
        val_loss = all_reduce_mean(mean, self.mesh.dp_group).item()
        record = {"step": self.step, "eval/loss": val_loss}
        if self.cfg.model.family == "llm":
            record["eval/ppl"] = math.exp(min(val_loss, 50.0))
        log.print(f"step {self.step}: val loss {val_loss:.4f}")
        model.train()
        extra = self.task.evaluate_extra(self, log)  # collective: every rank takes part
        self.router.discard()  # the sampling forwards are not training routing either
        record.update(extra)
        log.log(record)
        return val_loss, extra


def train(cfg: Config, run_dir: str, resume_from: str | None = None) -> TrainResult:
    os.makedirs(run_dir, exist_ok=True)
    return Trainer(cfg, run_dir, resume_from).run()
