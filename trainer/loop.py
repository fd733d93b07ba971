"""The training loop that runs on every rank: build, resume, train, evaluate, checkpoint."""
from __future__ import annotations

import math
import os
import re
import time
from dataclasses import dataclass

import torch

import models
from models.moe import (moe_layer_indices, moe_layers, pop_router_stats, pop_step_loads, set_aux_loss_scale,
                        update_aux_free_bias)
from models.peft import partially_frozen_parameters, zero_frozen_expert_grads
from parallel import (ParallelMesh, all_reduce_mean, all_reduce_sum, apply_expert_parallel, build_mesh, clip_grad_norm,
                      parallelize, parallelize_pipeline, pick_device, sync_context, sync_expert_grads,
                      sync_replicated_grads, unwrap)
from parallel.watchdog import Watchdog
from trainer.checkpoint import load_checkpoint, resume_point, save_checkpoint
from trainer.checkpoint_files import latest_checkpoint
from parallel.config import pp_microbatches
from trainer.config import Config
from trainer.ema import EMA
from trainer.guards import CollapseMonitor, NonFiniteGuard, clip_with_norm
from trainer.metrics import MetricsLogger
from trainer.adapt.peft import PeftState, prepare_peft
from trainer.adapt.prune import PruneResult, finish_prune, prune_model, resumed_prune_config
from trainer.tasks import build_task
from trainer.adapt.hf_bridge import init_model_from
from trainer.adapt.upcycle import upcycle_into
from trainer.optim import build_optimizer, build_scheduler
from trainer.plots import overload_factors


@dataclass
class TrainResult:
    final_step: int
    final_val_loss: float | None
    unigram_entropy_nats: float | None  # LM runs: the corpus's unigram entropy, a reference loss
    final_eval: dict | None = None  # the last family-specific evaluation (DiT: eval/acc, eval/fd)


class Trainer:
    """Holds the live objects of one run on one rank. `run()` does the whole job."""

    def __init__(self, cfg: Config, run_dir: str, resume_from: str | None = None):
        self.cfg, self.run_dir = cfg, run_dir
        if cfg.prune.method != "none" and (resume_from or latest_checkpoint(run_dir)):
            # A prune run that already compressed: train on from its checkpoints, with their shapes.
            cfg = self.cfg = resumed_prune_config(cfg, resume_from or latest_checkpoint(run_dir))
        self.device = pick_device(cfg.train.device)
        self.mesh: ParallelMesh = build_mesh(cfg.parallel, self.device)
        # Heartbeats, so a failed collective names the ranks that did not arrive (parallel/watchdog.py).
        self.watchdog = Watchdog.start(self.mesh.rank, self.mesh.world_size, cfg.parallel.timeout_s)
        self.guard = NonFiniteGuard(cfg.train.max_nonfinite_steps)  # trainer/guards.py
        self.collapse = CollapseMonitor.from_config(cfg)
        torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
        self.task = build_task(cfg, self.mesh, self.device)  # data, loss and evaluation of the family
        self.data = self.task.data
        with torch.device(self.device):
            model = models.build_model(cfg.model, cfg.moe)
        # The aux-loss gradient of one forward: 1 / (forwards per optimizer step), as the LM loss.
        forwards = cfg.train.grad_accum_steps * (pp_microbatches(cfg.parallel) if self.mesh.pp > 1 else 1)
        set_aux_loss_scale(model, 1.0 / forwards)
        # Pruning: the checkpoint compressed on the whole model, before experts are sharded,
        # stages split or an optimizer holds the parameters (trainer/adapt/prune.py).
        self.prune: PruneResult | None = None
        if cfg.prune.method != "none":
            self.prune = prune_model(model, cfg, self.task, self.mesh, run_dir)
            cfg = self.cfg = self.prune.cfg
        self.param_counts = models.param_counts(model, cfg.moe)  # before ep shards the experts
        resume_path = resume_point(run_dir, resume_from)  # a torchrun restart: this launch's newest
        upcycled = None
        if resume_path is None and cfg.model.upcycle_from:
            # A fresh MoE run from a dense checkpoint: upcycled whole, before experts are sharded
            # or stages split, so every layout starts from the same weights and router init.
            upcycled = upcycle_into(model, cfg.model.upcycle_from, granularity=cfg.model.upcycle_granularity,
                                    seed=cfg.train.seed)
        elif resume_path is None and cfg.model.init_from:
            # A fresh run from a Hugging Face model or a checkpoint of ours, loaded whole before
            # experts are sharded or stages split, as upcycling (trainer/adapt/hf_bridge.py).
            upcycled = init_model_from(model, cfg.model.init_from)
        # PEFT: base weights, (ESFT) expert selection and adapters on the whole model, before
        # experts are sharded or stages split: adapters are then sharded and split like the rest.
        self.peft: PeftState | None = None
        if cfg.peft.method != "none":
            self.peft, base_line = prepare_peft(model, cfg, self.task, self.mesh, resume_path)
            if self.mesh.is_main:
                print(f"{base_line}\n{self.peft.summary}", flush=True)
        self.pipeline = None
        if self.mesh.pp > 1:  # this rank keeps its stages only; self.model holds their parameters
            self.pipeline = parallelize_pipeline(model, self.mesh, cfg.parallel, self.task.pipeline_loss_fn,
                                                 micro_batch_size=cfg.train.micro_batch_size,
                                                 grad_accum_steps=cfg.train.grad_accum_steps, seq_len=cfg.data.seq_len)
            model = self.model = self.pipeline.module
        elif cfg.train.engine == "deepspeed":  # experts sharded here; DeepSpeed wraps it below, not DDP
            self.model = apply_expert_parallel(model, self.mesh, cfg.parallel.ep_overlap, cfg.parallel.ep_chunks)
        else:
            self.model = parallelize(model, self.mesh, cfg.parallel)
        layers = moe_layers(model)
        self.num_moe_layers = len(layers)
        # Aux-free balancing needs the loads summed over dp every step; without it, no collective.
        # A PEFT run that freezes the routers keeps the base's routing, selection bias included.
        routing_frozen = cfg.peft.method in ("lora", "perft", "esft") and not cfg.peft.train_router
        self.aux_free = any(layer.expert_bias_E is not None for layer in layers) and not routing_frozen
        # From the whole model, not this rank's layers: under pp every rank joins the heatmap's gather.
        self.heatmap_every = max(cfg.logging.heatmap_every, 0) if cfg.moe.num_experts > 0 else 0
        self.heatmap_loads_LE: torch.Tensor | None = None  # routed since the previous heatmap
        self.engine = None  # train.engine=deepspeed: ZeRO's optimizer and our schedule (trainer/adapt/ds_engine.py)
        if cfg.train.engine == "deepspeed":
            from trainer.adapt.ds_engine import DeepSpeedEngine

            self.engine = DeepSpeedEngine(model, cfg, self.mesh, no_decay_params=partially_frozen_parameters(model))
            # What checkpoints save beside the model in DCP: the optimizer of the experts outside ZeRO.
            self.optimizer, self.scheduler = self.engine.expert_optimizer or (), self.engine.scheduler
        else:
            # ESFT's expert tensors hold frozen rows: no weight decay, so those rows never move.
            self.optimizer = build_optimizer(model, cfg.optim, no_decay_params=partially_frozen_parameters(model))
            self.scheduler = build_scheduler(self.optimizer, cfg.train.steps, cfg.optim)
        # DiT: an EMA of this rank's parameters, for sampling (checkpointed with them).
        self.ema = EMA(model, cfg.diffusion.ema_decay) if cfg.model.family == "dit" else None
        # Per-rank RNG stream from here on (dropout, jitter), reproducible and resumable.
        torch.manual_seed(cfg.train.seed + 1 + self.mesh.rank)
        if upcycled and self.mesh.is_main:
            print(upcycled, flush=True)
        self.step = self._resume(resume_path)
        self.autocast = torch.autocast(self.device.type, dtype=torch.bfloat16,
                                       enabled=cfg.train.dtype == "bf16")

    @property
    def unwrapped_model(self):
        return unwrap(self.model)

    def _extra_state(self) -> dict:
        return {"ema": self.ema.state_dict()} if self.ema is not None else {}

    def _run_state(self) -> dict:
        """Saved with each checkpoint and read before the model is built on resume."""
        if self.peft is not None and self.peft.esft_selection is not None:
            return {"esft_selection": self.peft.esft_selection}
        return {}

    def _resume(self, path: str | None) -> int:
        if path is None:
            return 0
        step = load_checkpoint(path, self.model, self.optimizer, self.scheduler, self.data, self.mesh,
                               extra_state=self._extra_state(), engine=self.engine)
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
            val_loss, final_eval = finish_prune(self, log)
        try:
            while self.step < cfg.train.steps:
                step_start = time.perf_counter()
                self.watchdog.mark(self.step + 1, "train step")
                loss, grad_norm = self._train_step(batches)
                window_seconds += time.perf_counter() - step_start
                self.step += 1
                window_steps += 1
                if self.step % cfg.train.log_every == 0 or self.step == cfg.train.steps:
                    tokens_per_s = tokens_per_step * window_steps / max(window_seconds, 1e-9)
                    record = {"step": self.step, "loss": loss, "lr": self.scheduler.get_last_lr()[0],
                              "grad_norm": grad_norm, "tokens_per_s": tokens_per_s}
                    self.watchdog.mark(self.step, "metrics (router statistics over dp)")
                    record.update(self._router_stats())
                    record.update(self._task_metrics())
                    record.update(self.guard.pop_metrics())
                    for warning in self.collapse.update(self.step, record):
                        log.print(warning)
                    log.log(record)
                    log.progress(self.step, loss, tokens_per_s)
                    window_seconds, window_steps = 0.0, 0
                if self.heatmap_every and self.step % self.heatmap_every == 0:
                    self._expert_load_heatmap(log)
                evaluate_now = cfg.eval.every and self.step % cfg.eval.every == 0
                if evaluate_now or self.step == cfg.train.steps:
                    self.watchdog.mark(self.step, "evaluation")
                    val_loss, final_eval = self._evaluate(log)
                stopping = cfg.train.stop_at_step and self.step == cfg.train.stop_at_step
                if cfg.checkpoint.enabled and (self.step % cfg.checkpoint.every == 0
                                               or self.step == cfg.train.steps or stopping):
                    self.watchdog.mark(self.step, "checkpoint save")
                    save_checkpoint(self.run_dir, self.step, self.model, self.optimizer, self.scheduler,
                                    self.data, cfg, mesh, extra_state=self._extra_state(),
                                    run_state=self._run_state(), engine=self.engine)
                if stopping:
                    log.print(f"stopping at step {self.step} (train.stop_at_step); rerun to resume")
                    break
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

    def _train_step(self, batches) -> tuple[float, float]:
        """One optimizer step over grad_accum_steps micro batches; returns (loss, grad norm)."""
        cfg, model = self.cfg, self.model
        model.train()
        num_micro = cfg.train.grad_accum_steps
        loss_sum = torch.zeros((), device=self.device)
        if self.pipeline is not None:
            return self._pipeline_train_step(batches)
        if self.engine is not None:
            return self._deepspeed_train_step(batches)
        for micro in range(num_micro):
            batch = self.task.to_device(next(batches))
            with sync_context(model, micro == num_micro - 1):
                with self.autocast:
                    loss = self.task.micro_batch_loss(model, batch) / num_micro
                loss.backward()  # MoE aux losses ride along inside the graph (scaled 1/num_micro)
            loss_sum += loss.detach()
        zero_frozen_expert_grads(unwrap(model))  # ESFT: the rows of unselected experts stay put
        sync_expert_grads(model, self.mesh)  # expert grads over their expert-data-parallel group
        grad_norm = clip_grad_norm(model, self.mesh, float("inf"))  # norm of the whole (sharded) model
        mean_loss = all_reduce_mean(loss_sum, self.mesh.dp_group)
        if self.guard.check(self.step + 1, mean_loss, grad_norm, unwrap(model)):  # same on every rank
            clip_with_norm(unwrap(model), cfg.optim.grad_clip, grad_norm)
            self.optimizer.step()
            self.scheduler.step()
            if self.ema is not None:
                self.ema.update()
            self._expert_loads_step()
        else:
            self._skip_step(mean_loss, grad_norm)
        self.optimizer.zero_grad(set_to_none=True)
        return mean_loss.item(), grad_norm.item()

    def _skip_step(self, loss: torch.Tensor, grad_norm: torch.Tensor) -> None:
        """A non-finite step: no optimizer, scheduler, EMA or aux-free bias update (trainer/guards.py)."""
        pop_step_loads(unwrap(self.model))  # its routing is not trained on, nor drawn in the heatmap
        if self.mesh.is_main:
            print(self.guard.describe_skip(self.step + 1, loss.item(), grad_norm.item()), flush=True)

    def _deepspeed_train_step(self, batches) -> tuple[float, float]:
        """`_train_step` with train.engine=deepspeed (trainer/adapt/ds_engine.py explains the steps)."""
        num_micro = self.cfg.train.grad_accum_steps
        loss_sum = torch.zeros((), device=self.device)
        for _ in range(num_micro):
            batch = self.task.to_device(next(batches))
            with self.autocast:
                loss = self.task.micro_batch_loss(self.engine.engine, batch) / num_micro
            self.engine.backward(loss)  # not rescaled by DeepSpeed: aux losses ride along as above
            loss_sum += loss.detach()
        grad_norm = self.engine.step()  # experts over edp, clip by the whole model's norm, step, lr
        mean_loss = all_reduce_mean(loss_sum, self.mesh.dp_group)
        norm = torch.tensor(grad_norm)
        # DeepSpeed itself skips a step whose norm is not finite (fp32, and bf16's check_grad_overflow).
        if self.guard.check(self.step + 1, mean_loss, norm, self.model):
            if self.ema is not None:
                self.ema.update()
            self._expert_loads_step()
        else:
            self._skip_step(mean_loss, norm)
        return mean_loss.item(), grad_norm

    def _pipeline_train_step(self, batches) -> tuple[float, float]:
        """`_train_step` under pipeline parallelism (parallel/pipeline.py explains the steps)."""
        cfg, pipe, mesh = self.cfg, self.pipeline, self.mesh
        loss_sum = torch.zeros((), device=self.device)
        for _ in range(cfg.train.grad_accum_steps):
            inputs, target = self.task.pipeline_args(self.task.to_device(next(batches)))
            with self.autocast:
                loss = pipe.step(inputs, target)  # scaled: sums to the mean over the step
            if loss is not None:
                loss_sum += loss
        zero_frozen_expert_grads(self.model)
        sync_replicated_grads(self.model, mesh)  # no DDP around stages: one all-reduce over dp
        sync_expert_grads(self.model, mesh)
        grad_norm = clip_grad_norm(self.model, mesh, float("inf"))  # squares summed over the stages
        loss = pipe.broadcast_from_last(loss_sum if pipe.has_last else None, self.device)
        loss = all_reduce_mean(loss, mesh.dp_group)
        if self.guard.check(self.step + 1, loss, grad_norm, self.model):  # same on every rank
            clip_with_norm(self.model, cfg.optim.grad_clip, grad_norm)
            self.optimizer.step()
            self.scheduler.step()
            if self.ema is not None:  # DiT: this rank's stages' EMA
                self.ema.update()
            self._expert_loads_step()
        else:
            self._skip_step(loss, grad_norm)
        self.optimizer.zero_grad(set_to_none=True)
        return loss.item(), grad_norm.item()

    def _task_metrics(self) -> dict:
        """The task's own per-step metrics (DiT: diffusion/mse, diffusion/vlb), mean over dp."""
        metrics = self.task.pop_metrics()
        if not metrics:
            return {}
        keys = sorted(metrics)
        values = all_reduce_mean(torch.tensor([metrics[k] for k in keys], dtype=torch.float64,
                                              device=self.device), self.mesh.dp_group)
        return dict(zip(keys, values.tolist()))

    def _gather_layers_over_pp(self, rows_LE: torch.Tensor | None) -> torch.Tensor | None:
        """Per-MoE-layer rows of this rank's stages -> the whole model's rows (pp > 1), in layer
        order, on every rank; the rows themselves when pp == 1."""
        if self.mesh.pp == 1:
            return rows_LE
        import torch.distributed as dist

        mine = (moe_layer_indices(self.model), None if rows_LE is None else rows_LE.cpu())
        gathered: list = [None] * self.mesh.pp
        dist.all_gather_object(gathered, mine, group=self.mesh.pp_group)
        pairs = sorted((i, row) for ids, rows in gathered if rows is not None for i, row in zip(ids, rows))
        return _stack_rows([row for _, row in pairs]) if pairs else None

    def _expert_loads_step(self) -> None:
        """After each optimizer step: the aux-loss-free bias update, and the heatmap's loads."""
        if not self.num_moe_layers:
            return
        loads_LE = pop_step_loads(unwrap(self.model))
        if self.aux_free:
            # Every rank applies the update computed from the same global loads, so the bias
            # buffers (which DDP does not re-broadcast) stay identical across the dp group.
            loads_LE = all_reduce_sum(loads_LE, self.mesh.dp_group)
            update_aux_free_bias(unwrap(self.model), loads_LE)
        if self.heatmap_every:
            loads_LE = loads_LE.double()
            for row, layer in zip(loads_LE, moe_layers(unwrap(self.model))):
                row[layer.router.num_experts:] = float("nan")  # experts a pruned layer does not have
            acc = self.heatmap_loads_LE
            self.heatmap_loads_LE = loads_LE if acc is None else acc + loads_LE

    def _expert_load_heatmap(self, log: MetricsLogger) -> None:
        """Plot the loads routed since the previous heatmap (or the start/resume of this process),
        summed over dp ranks; rank 0 writes RUN_DIR/plots/expert_load_step_XXXXXXXX.png."""
        loads_LE, self.heatmap_loads_LE = self.heatmap_loads_LE, None
        if loads_LE is not None and not self.aux_free:  # aux-free: summed at every step already
            loads_LE = all_reduce_sum(loads_LE, self.mesh.dp_group)
        loads_LE = self._gather_layers_over_pp(loads_LE)  # every stage's layers (pp > 1)
        if loads_LE is None:
            return
        if self.mesh.is_main:
            from trainer.plots import save_expert_load_heatmap

            path = save_expert_load_heatmap(loads_LE.cpu(), self.step, self.run_dir)
            log.log_image("moe/expert_load", path, self.step)

    def _router_stats(self) -> dict:
        """Router statistics since the previous log step, over the whole dp group.

        Scalars (losses, entropy, dropped fraction, bias sizes) are averaged over the ranks, which
        see equally many tokens. Loads are summed over the ranks and the max/mean ratios recomputed
        from the sums: the balance of the global batch, not a mean of per-rank ratios (that would
        overstate the imbalance, each rank seeing fewer tokens). One collective for both.
        """
        scalars, loads_LE = pop_router_stats(unwrap(self.model), with_loads=True)
        if self.mesh.pp > 1:
            return self._pipeline_router_stats(scalars, loads_LE)
        if not scalars:
            return {}
        keys = sorted(scalars)
        flat = torch.tensor([scalars[k] for k in keys], dtype=torch.float64, device=self.device)
        if loads_LE is not None:
            flat = torch.cat([flat, loads_LE.to(self.device, torch.float64).flatten()])
        flat = all_reduce_sum(flat, self.mesh.dp_group).cpu()
        stats = dict(zip(keys, (flat[:len(keys)] / self.mesh.dp).tolist()))
        if loads_LE is not None:
            stats.update(_load_stats(flat[len(keys):].view(loads_LE.shape), keys,
                                     self.cfg.logging.expert_loads))
        return stats

    def _pipeline_router_stats(self, scalars: dict, loads_LE: torch.Tensor | None) -> dict:
        """`_router_stats` when each rank holds some stages' MoE layers: per stage the sums over
        dp, then every stage's per-layer values, loads and layer counts gathered over pp; the
        means over layers recomputed from them (weighted by each stage's MoE layers)."""
        import torch.distributed as dist

        keys = sorted(scalars)
        flat = torch.tensor([scalars[k] for k in keys], dtype=torch.float64)
        if loads_LE is not None:
            flat = torch.cat([flat, loads_LE.to(torch.float64).flatten()])
        flat = all_reduce_sum(flat.to(self.device), self.mesh.dp_group).cpu()  # loads: summed
        mine = (keys, (flat[:len(keys)] / self.mesh.dp).tolist(), self.num_moe_layers,  # scalars: mean
                moe_layer_indices(self.model), None if loads_LE is None else flat[len(keys):].view(loads_LE.shape))
        gathered: list = [None] * self.mesh.pp
        dist.all_gather_object(gathered, mine, group=self.mesh.pp_group)
        stats: dict = {}
        weight: dict = {}
        rows = []
        for stage_keys, values, num_layers, ids, stage_loads in gathered:
            for k, v in zip(stage_keys, values):
                if k.startswith("moe/layer") or k == "moe/aux_free_bias_abs_max":
                    stats[k] = max(v, stats.get(k, v))  # per-layer keys are unique to one stage
                else:  # a mean over this stage's layers
                    stats[k] = stats.get(k, 0.0) + v * num_layers
                    weight[k] = weight.get(k, 0) + num_layers
            if stage_loads is not None:
                rows.extend(zip(ids, stage_loads))
        for k, w in weight.items():
            stats[k] /= w
        if rows:
            rows.sort(key=lambda pair: pair[0])
            all_keys = sorted(stats)
            stats.update(_load_stats(_stack_rows([r for _, r in rows]), all_keys, self.cfg.logging.expert_loads))
        return stats

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
        pop_router_stats(model)  # eval routing is not training routing; keep the stats clean
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
        pop_router_stats(model)  # the sampling forwards are not training routing either
        record.update(extra)
        log.log(record)
        return val_loss, extra


def _load_stats(loads_LE: torch.Tensor, keys: list[str], with_loads: bool) -> dict:
    """The load-balance keys of `pop_router_stats`, recomputed from loads summed over ranks.

    Row r of `loads_LE` is the r-th MoE layer that reported statistics, i.e. the r-th
    `moe/layer{i}/...` index in `keys`.
    """
    matches = (re.fullmatch(r"moe/layer(\d+)/load_max_over_mean", k) for k in keys)
    layer_ids = sorted(int(m.group(1)) for m in matches if m)
    ratios_L = overload_factors(loads_LE)
    out = {"moe/load_max_over_mean": ratios_L.mean().item()}
    out.update({f"moe/layer{i}/load_max_over_mean": r for i, r in zip(layer_ids, ratios_L.tolist())})
    if with_loads:  # exact integers: counts of (token, slot) assignments
        # One list per layer, of its own experts (a pruned model's layers differ: NaN past the count).
        out["moe/tokens_per_expert"] = [row[~row.isnan()].round().long().tolist() for row in loads_LE]
    return out


def _stack_rows(rows: list[torch.Tensor]) -> torch.Tensor:
    """Per-layer rows of expert values stacked [L, E], NaN-padded to the widest (pruned layers)."""
    width = max(r.numel() for r in rows)
    return torch.stack([torch.nn.functional.pad(r.double(), (0, width - r.numel()), value=float("nan")) for r in rows])


def train(cfg: Config, run_dir: str, resume_from: str | None = None) -> TrainResult:
    os.makedirs(run_dir, exist_ok=True)
    return Trainer(cfg, run_dir, resume_from).run()
