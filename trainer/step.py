"""One optimizer step of a run: the micro steps' forward and backward for each engine (native DDP,
pipeline stages, DeepSpeed), then one shared finish (non-finite guard, clip, update, EMA, router
loads)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from models.peft import zero_frozen_expert_grads
from parallel import (ParallelMesh, all_reduce_mean, clip_grad_norm, sync_context, sync_expert_grads,
                      sync_replicated_grads, unwrap)
from trainer.guards import NonFiniteGuard, clip_with_norm
from trainer.router_stats import RouterStats


@dataclass
class Stepper:
    """What one optimizer step touches. `model` holds this rank's parameters (DDP-wrapped, a
    pipeline's stage module, or DeepSpeed's module); `pipeline` / `engine` select the engine."""

    model: nn.Module
    mesh: ParallelMesh
    task: object  # trainer/lm/task.py or trainer/diffusion/task.py
    optimizer: object
    scheduler: object
    guard: NonFiniteGuard
    router: RouterStats
    grad_accum_steps: int
    grad_clip: float
    autocast: object
    ema: object | None = None
    pipeline: object | None = None  # parallel.pipeline.Pipeline
    engine: object | None = None  # trainer/adapt/ds_engine.py

    def __call__(self, batches, step: int) -> tuple[float, float]:
        """Optimizer step `step` (1-based) over grad_accum_steps micro batches of `batches`;
        returns (loss, grad norm), the same on every rank."""
        self.model.train()
        if self.pipeline is not None:
            loss, grad_norm = self._pipeline_micro_steps(batches)
        elif self.engine is not None:
            loss, grad_norm = self._deepspeed_micro_steps(batches)
            return self._finish(step, loss, grad_norm, update=None)  # DeepSpeed stepped already
        else:
            loss, grad_norm = self._native_micro_steps(batches)
        return self._finish(step, loss, grad_norm, update=self._update)

    def _native_micro_steps(self, batches) -> tuple[torch.Tensor, torch.Tensor]:
        model, n = self.model, self.grad_accum_steps
        loss_sum = torch.zeros((), device=self.mesh.device)
        for micro in range(n):
            batch = self.task.to_device(next(batches))
            with sync_context(model, micro == n - 1):  # DDP reduces on the last micro step only
                with self.autocast:
                    loss = self.task.micro_batch_loss(model, batch) / n
                loss.backward()  # MoE aux losses ride along inside the graph (scaled 1/n)
            loss_sum += loss.detach()
        zero_frozen_expert_grads(unwrap(model))  # ESFT: the rows of unselected experts stay put
        sync_expert_grads(model, self.mesh)  # expert grads over their expert-data-parallel group
        grad_norm = clip_grad_norm(model, self.mesh, float("inf"))  # norm of the whole (sharded) model
        return all_reduce_mean(loss_sum, self.mesh.dp_group), grad_norm

    def _pipeline_micro_steps(self, batches) -> tuple[torch.Tensor, torch.Tensor]:
        """parallel/pipeline.py explains the steps."""
        pipe, mesh = self.pipeline, self.mesh
        loss_sum = torch.zeros((), device=mesh.device)
        for _ in range(self.grad_accum_steps):
            inputs, target = self.task.pipeline_args(self.task.to_device(next(batches)))
            with self.autocast:
                loss = pipe.step(inputs, target)  # scaled: sums to the mean over the step
            if loss is not None:
                loss_sum += loss
        zero_frozen_expert_grads(self.model)
        sync_replicated_grads(self.model, mesh)  # no DDP around stages: one all-reduce over dp
        sync_expert_grads(self.model, mesh)
        grad_norm = clip_grad_norm(self.model, mesh, float("inf"))  # squares summed over the stages
        loss = pipe.broadcast_from_last(loss_sum if pipe.has_last else None, mesh.device)
        return all_reduce_mean(loss, mesh.dp_group), grad_norm

    def _deepspeed_micro_steps(self, batches) -> tuple[torch.Tensor, torch.Tensor]:
        """trainer/adapt/ds_engine.py explains the steps."""
        n = self.grad_accum_steps
        loss_sum = torch.zeros((), device=self.mesh.device)
        for _ in range(n):
            batch = self.task.to_device(next(batches))
            with self.autocast:
                loss = self.task.micro_batch_loss(self.engine.engine, batch) / n
            self.engine.backward(loss)  # not rescaled by DeepSpeed: aux losses ride along as above
            loss_sum += loss.detach()
        # Experts over edp, clip by the whole model's norm, step, lr. DeepSpeed itself skips a
        # step whose norm is not finite (fp32, and bf16's check_grad_overflow).
        grad_norm = torch.tensor(self.engine.step(), dtype=torch.float64)
        return all_reduce_mean(loss_sum, self.mesh.dp_group), grad_norm

    def _update(self, grad_norm: torch.Tensor) -> None:
        clip_with_norm(unwrap(self.model), self.grad_clip, grad_norm)
        self.optimizer.step()
        self.scheduler.step()

    def _finish(self, step: int, loss: torch.Tensor, grad_norm: torch.Tensor,
                update: Callable[[torch.Tensor], None] | None) -> tuple[float, float]:
        """The guard decides (the same on every rank): update, EMA and router loads, or a skip."""
        if self.guard.check(step, loss, grad_norm, unwrap(self.model)):
            if update is not None:
                update(grad_norm)
            if self.ema is not None:  # DiT: this rank's EMA
                self.ema.update()
            self.router.after_step()
        else:  # no optimizer, scheduler, EMA or aux-free bias update (trainer/guards.py)
            self.router.skip_step()
            if self.mesh.is_main:
                print(self.guard.describe_skip(step, loss.item(), grad_norm.item()), flush=True)
        if self.engine is None:
            self.optimizer.zero_grad(set_to_none=True)
        return loss.item(), grad_norm.item()
