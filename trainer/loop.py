"""The training loop that runs on every rank: build, resume, train, evaluate, checkpoint."""
from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass

import torch

import models
from models.moe import pop_router_stats, set_aux_loss_scale
from parallel import ParallelMesh, all_reduce_mean, build_mesh, parallelize, pick_device, sync_context, unwrap
from trainer.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from trainer.config import Config
from trainer.data import build_text_data
from trainer.metrics import MetricsLogger
from trainer.objectives import lm_loss
from trainer.optim import build_optimizer, build_scheduler


@dataclass
class TrainResult:
    final_step: int
    final_val_loss: float | None
    unigram_entropy_nats: float


class Trainer:
    """Holds the live objects of one run on one rank. `run()` does the whole job."""

    def __init__(self, cfg: Config, run_dir: str, resume_from: str | None = None):
        self.cfg, self.run_dir = cfg, run_dir
        self.device = pick_device(cfg.train.device)
        self.mesh: ParallelMesh = build_mesh(cfg.parallel, self.device)
        torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
        self.data = build_text_data(cfg.data, cfg.train.micro_batch_size, self.mesh.dp_rank,
                                    self.mesh.dp, cfg.train.seed)
        if self.data.vocab_size > cfg.model.vocab_size:
            raise ValueError(f"model.vocab_size={cfg.model.vocab_size} is smaller than the tokenizer's "
                             f"vocabulary ({self.data.vocab_size}, data.tokenizer={cfg.data.tokenizer})")
        with torch.device(self.device):
            model = models.build_model(cfg.model, cfg.moe)
        set_aux_loss_scale(model, 1.0 / cfg.train.grad_accum_steps)
        self.model = parallelize(model, self.mesh)
        self.optimizer = build_optimizer(model, cfg.optim)
        self.scheduler = build_scheduler(self.optimizer, cfg.train.steps, cfg.optim)
        # Per-rank RNG stream from here on (dropout, jitter), reproducible and resumable.
        torch.manual_seed(cfg.train.seed + 1 + self.mesh.rank)
        self.step = self._resume(resume_from)
        self.autocast = torch.autocast(self.device.type, dtype=torch.bfloat16,
                                       enabled=cfg.train.dtype == "bf16")

    def _resume(self, resume_from: str | None) -> int:
        path = resume_from or latest_checkpoint(self.run_dir)
        if path is None:
            return 0
        step = load_checkpoint(path, self.model, self.optimizer, self.scheduler, self.data, self.mesh)
        if self.mesh.is_main:
            print(f"resumed from {path} at step {step}", flush=True)
        return step

    def run(self) -> TrainResult:
        cfg, mesh = self.cfg, self.mesh
        log = MetricsLogger(self.run_dir, cfg, mesh.is_main, self.step, cfg.train.steps)
        total, active = models.param_counts(unwrap(self.model), cfg.moe)
        log.print(f"params: {total:,} total, {active:,} active per token; world size {mesh.world_size}; "
                  f"{self.data.num_train_tokens:,} training tokens")
        batches = self.data.train_batches()
        tokens_per_step = cfg.train.micro_batch_size * cfg.data.seq_len * cfg.train.grad_accum_steps * mesh.dp
        window_start, window_steps = time.perf_counter(), 0
        val_loss = None
        try:
            while self.step < cfg.train.steps:
                loss, grad_norm = self._train_step(batches)
                self.step += 1
                window_steps += 1
                if self.step % cfg.train.log_every == 0 or self.step == cfg.train.steps:
                    elapsed = time.perf_counter() - window_start
                    tokens_per_s = tokens_per_step * window_steps / max(elapsed, 1e-9)
                    record = {"step": self.step, "loss": loss, "lr": self.scheduler.get_last_lr()[0],
                              "grad_norm": grad_norm, "tokens_per_s": tokens_per_s}
                    record.update(self._router_stats())
                    log.log(record)
                    log.progress(self.step, loss, tokens_per_s)
                    window_start, window_steps = time.perf_counter(), 0
                evaluate_now = cfg.eval.every and self.step % cfg.eval.every == 0
                if evaluate_now or self.step == cfg.train.steps:
                    val_loss = self._evaluate(log)
                stopping = cfg.train.stop_at_step and self.step == cfg.train.stop_at_step
                if cfg.checkpoint.enabled and (self.step % cfg.checkpoint.every == 0
                                               or self.step == cfg.train.steps or stopping):
                    save_checkpoint(self.run_dir, self.step, self.model, self.optimizer, self.scheduler,
                                    self.data, cfg, mesh)
                if stopping:
                    log.print(f"stopping at step {self.step} (train.stop_at_step); rerun to resume")
                    break
        finally:
            log.close()
        if val_loss is not None and mesh.is_main:
            print(f"final: step {self.step}, val loss {val_loss:.4f} nats/token "
                  f"(ppl {math.exp(val_loss):.2f}); unigram entropy of the corpus "
                  f"{self.data.unigram_entropy_nats:.4f} nats/token", flush=True)
        return TrainResult(self.step, val_loss, self.data.unigram_entropy_nats)

    def _train_step(self, batches) -> tuple[float, float]:
        """One optimizer step over grad_accum_steps micro batches; returns (loss, grad norm)."""
        cfg, model = self.cfg, self.model
        model.train()
        num_micro = cfg.train.grad_accum_steps
        loss_sum = torch.zeros((), device=self.device)
        for micro in range(num_micro):
            inputs, targets = (t.to(self.device, non_blocking=True) for t in next(batches))
            with sync_context(model, micro == num_micro - 1):
                with self.autocast:
                    loss = lm_loss(model(inputs), targets) / num_micro
                loss.backward()  # MoE aux losses ride along inside the graph (scaled 1/num_micro)
            loss_sum += loss.detach()
        clip = cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(unwrap(model).parameters(), clip)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        mean_loss = all_reduce_mean(loss_sum, self.mesh.dp_group)
        return mean_loss.item(), grad_norm.item()

    def _router_stats(self) -> dict:
        stats = pop_router_stats(unwrap(self.model))
        if self.mesh.dp_group is None or not stats:
            return stats
        keys = sorted(stats)
        values = all_reduce_mean(torch.tensor([stats[k] for k in keys], dtype=torch.float64),
                                 self.mesh.dp_group)
        return dict(zip(keys, values.tolist()))

    @torch.no_grad()
    def _evaluate(self, log: MetricsLogger) -> float:
        model = unwrap(self.model)
        model.eval()
        losses = []
        for inputs, targets in self.data.val_batches(self.cfg.eval.batches):
            with self.autocast:
                losses.append(lm_loss(model(inputs.to(self.device)), targets.to(self.device)))
        pop_router_stats(model)  # eval routing is not training routing; keep the stats clean
        val_loss = all_reduce_mean(torch.stack(losses).mean(), self.mesh.dp_group).item()
        log.log({"step": self.step, "eval/loss": val_loss, "eval/ppl": math.exp(min(val_loss, 50.0))})
        log.print(f"step {self.step}: val loss {val_loss:.4f}")
        model.train()
        return val_loss


def train(cfg: Config, run_dir: str, resume_from: str | None = None) -> TrainResult:
    os.makedirs(run_dir, exist_ok=True)
    return Trainer(cfg, run_dir, resume_from).run()
