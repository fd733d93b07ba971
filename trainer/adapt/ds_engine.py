"""The DeepSpeed engine (`train.engine: deepspeed`): ZeRO-1/2 for the data-parallel parameters, the
routed experts under our expert parallelism. DeepSpeed is imported here only (the `deepspeed` extra).

Who holds what
    ep == 1  every parameter is data parallel, experts included: all go to ZeRO, which partitions
             their optimizer states (stage 1) and gradients (stage 2) over dp and averages the
             gradients over dp, as DDP does.
    ep > 1   the routed experts are sharded over the ep group (parallel/expert_parallel.py): ranks
             hold different experts, which ZeRO must neither partition nor average over dp.
             DeepSpeed's own MoE support keys on its MoE layer class (engine.has_moe_layers), which
             ours are not, so the experts stay out of DeepSpeed: an AdamW of their own (each rank
             the state of its E/ep experts, as with the native engine), their gradients reduced by
             `sync_expert_grads` over the expert-data-parallel group, exactly as with DDP.
DeepSpeed is told nothing about the experts, and two of its habits would touch them anyway: at
initialize it broadcasts every parameter from rank 0 (and casts it to bf16), so the experts' own
fp32 values are put back; its gradient norm covers only what ZeRO holds, so the experts' squares are
added to it (`_add_expert_norm`) and ZeRO clips by the whole model's norm, as `clip_grad_norm` does.

One optimizer step (`backward` per micro batch, then `step`):
    1. forward through the engine under the run's autocast; engine.backward(loss, scale_wrt_gas=False):
       the loss is already divided by grad_accum_steps, and so are the MoE aux losses attached inside
       the graph (set_aux_loss_scale), so DeepSpeed must not divide again. ZeRO-2 reduce-scatters
       the gradients it holds during each backward (averaged over dp).
    2. (ep > 1) sync_expert_grads: expert gradients summed over edp, divided by dp.
    3. engine.step(): DeepSpeed's accumulation is unmanaged (one step() per optimizer step is its
       accumulation boundary); ZeRO-1 reduce-scatters here; the norm is ZeRO's (squares summed over
       dp) plus the experts' (summed over ep); ZeRO clips its partitions by it, steps its AdamW (our
       param groups and lr) and all-gathers the updated parameters. A non-finite norm skips the step.
    4. (ep > 1) the experts clipped by the same factor and stepped with the same lr.
    5. our lr schedule steps (a LambdaLR on the AdamW that ZeRO wraps).

Checkpoints (trainer/checkpoint.py, `engine=`): the model and the experts' optimizer go into DCP as
with the native engine (each expert once: every tool that reads our checkpoints reads these); ZeRO's
partitioned optimizer state goes through engine.save_checkpoint into step_XXXXXXXX/deepspeed/,
inside the same .tmp directory that is renamed when complete. DeepSpeed's own module file there
(rank 0's parameters) is not read back: the weights come from DCP.
"""
from __future__ import annotations

import glob
import logging
import os

import torch
import torch.distributed as dist

from models.moe import is_expert_param
from parallel import ParallelMesh, sync_expert_grads
from trainer.config import Config
from trainer.optim import build_optimizer, build_scheduler

ZERO_DIR = "deepspeed"  # a checkpoint's subdirectory (and DeepSpeed tag) holding ZeRO's state


def import_deepspeed(device: torch.device | None = None):
    """deepspeed, quiet, or a one-line error naming the extra to install. DeepSpeed picks its
    accelerator when first imported: on a CPU run, its cpu accelerator even where CUDA is visible."""
    if device is not None and device.type == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    try:
        import deepspeed
        from deepspeed.utils import logger
    except ImportError as e:
        raise ImportError(f"train.engine=deepspeed needs DeepSpeed: pip install 'sparseforge[deepspeed]' ({e})") from None
    logger.setLevel(logging.WARNING)
    return deepspeed


def deepspeed_config(cfg: Config) -> dict:
    """DeepSpeed's JSON config for a run: our batch, accumulation, clipping, ZeRO stage and dtype."""
    tr = cfg.train
    return {
        "train_micro_batch_size_per_gpu": tr.micro_batch_size,
        "gradient_accumulation_steps": tr.grad_accum_steps,
        # step() is the accumulation boundary: we call it once per optimizer step (see 3.).
        "managed_gradient_accumulation": False,
        "gradient_clipping": cfg.optim.grad_clip,
        "zero_optimization": {"stage": tr.zero_stage},
        # bf16 weights and gradients, fp32 master weights and AdamW state in ZeRO's partitions.
        "bf16": {"enabled": tr.dtype == "bf16"},
        "steps_per_print": 1 << 40,  # our metrics log the steps
        "wall_clock_breakdown": False,
    }


class DeepSpeedEngine:
    """DeepSpeed's engine around a model whose experts are already sharded (apply_expert_parallel).

    Attributes:
        engine: DeepSpeed's engine (call it for the forward; `module` is the model).
        optimizer: the AdamW that ZeRO wraps (param groups and lr of the ZeRO-held parameters).
        scheduler: our lr schedule on it.
        expert_optimizer: AdamW of the routed experts when ep > 1 (outside ZeRO), else None.
    """

    def __init__(self, model: torch.nn.Module, cfg: Config, mesh: ParallelMesh, no_decay_params=()):
        deepspeed = import_deepspeed(mesh.device)
        self.cfg, self.mesh, self.module = cfg, mesh, model
        # deepspeed.comm on top of the process group build_mesh started (gloo on CPU).
        deepspeed.init_distributed(dist_backend="nccl" if mesh.device.type == "cuda" else "gloo", verbose=False)
        ours = {n for n, _ in model.named_parameters() if mesh.ep > 1 and is_expert_param(n)}
        trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.expert_params = [p for n, p in trainable if n in ours]
        zero_params = [p for n, p in trainable if n not in ours]
        if not zero_params:
            raise ValueError(f"train.engine=deepspeed: every trainable parameter is a routed expert under "
                             f"parallel.ep={mesh.ep}, nothing for ZeRO to hold; use train.engine=native")
        self.optimizer = build_optimizer(model, cfg.optim, no_decay_params, params=zero_params)
        self.scheduler = build_scheduler(self.optimizer, cfg.train.steps, cfg.optim)
        kept = {n: p.detach().clone() for n, p in model.named_parameters() if n in ours}
        self.engine, self.zero, _, _ = deepspeed.initialize(model=model, optimizer=self.optimizer,
                                                            config=deepspeed_config(cfg), dist_init_required=False)
        # initialize broadcast rank 0's parameters over dp (its experts too) and cast them to bf16:
        # each rank's own experts, in fp32, come back (the forward runs under autocast).
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name in kept:
                    param.data = kept[name]
        self.expert_optimizer = None
        if self.expert_params:
            self.expert_optimizer = build_optimizer(model, cfg.optim, no_decay_params, params=self.expert_params)
            _add_expert_norm(self.zero, self.expert_params, mesh)

    def backward(self, loss: torch.Tensor) -> None:
        """Backward of one micro batch's loss, already scaled 1/grad_accum_steps (step 1)."""
        self.engine.backward(loss, scale_wrt_gas=False)

    def step(self) -> float:
        """Steps 2-5 of the module docstring; returns the whole model's gradient norm (before clipping)."""
        sync_expert_grads(self.module, self.mesh)  # 2. no-op when ep == 1 (ZeRO holds the experts)
        self.engine.step()  # 3.
        norm = self.engine.get_global_grad_norm()
        norm = float("nan") if norm is None else float(norm)
        applied = self.engine.was_step_applied()
        if self.expert_optimizer is not None:  # 4.
            if applied:
                grads = [p.grad for p in self.expert_params if p.grad is not None]
                if self.cfg.optim.grad_clip > 0 and grads:
                    # As clip_grad_norm and ZeRO: scale by max_norm / (norm + 1e-6) when below 1.
                    torch._foreach_mul_(grads, min(1.0, self.cfg.optim.grad_clip / (norm + 1e-6)))
                lr = self.optimizer.param_groups[0]["lr"]
                for group in self.expert_optimizer.param_groups:
                    group["lr"] = lr
                self.expert_optimizer.step()
            self.expert_optimizer.zero_grad(set_to_none=True)
        if applied:  # 5. as DeepSpeed does with its own schedulers: a skipped step keeps the lr
            self.scheduler.step()
        return norm

    def save(self, directory: str) -> None:
        """ZeRO's partitioned optimizer state into directory/deepspeed/ (collective)."""
        self.engine.save_checkpoint(directory, tag=ZERO_DIR, save_latest=False, exclude_frozen_parameters=True)

    def load(self, directory: str) -> None:
        """ZeRO's optimizer state (fp32 master weights and AdamW moments) from directory/deepspeed/;
        the weights themselves were loaded from DCP before (collective)."""
        zero_dir = os.path.join(directory, ZERO_DIR)
        if not os.path.isdir(zero_dir):
            raise ValueError(f"{directory}: no DeepSpeed state (written by train.engine=native); resume it with "
                             f"train.engine=native")
        saved_dp = len(glob.glob(os.path.join(zero_dir, "*_optim_states.pt")))
        if saved_dp != self.mesh.dp:
            raise ValueError(f"{directory}: ZeRO's optimizer state is partitioned over {saved_dp} data-parallel "
                             f"ranks, this run has {self.mesh.dp}; resume with the same layout")
        path, _ = self.engine.load_checkpoint(directory, tag=ZERO_DIR, load_module_strict=False,
                                              load_lr_scheduler_states=False, custom_load_fn=_weights_from_dcp)
        if path is None:
            raise FileNotFoundError(f"{zero_dir}: DeepSpeed found no checkpoint to load")


def _weights_from_dcp(src, dst) -> None:
    """DeepSpeed's module load, skipped: the weights came from DCP (every expert, not rank 0's)."""


def _add_expert_norm(zero, expert_params: list, mesh: ParallelMesh) -> None:
    """Make ZeRO's gradient norm the whole model's: its own (the parameters it holds, squares summed
    over dp) combined with the experts' (each rank's shard, summed over the ep group; after
    sync_expert_grads the shards are equal over edp, so each expert counts once)."""
    zero_norm = zero.scaled_global_norm

    def scaled_global_norm(norm_type=2):
        norm = zero_norm(norm_type).float()
        sq = torch.zeros((), dtype=torch.float32, device=norm.device)
        for p in expert_params:
            if p.grad is not None:
                sq = sq + torch.linalg.vector_norm(p.grad, dtype=torch.float32).square()
        dist.all_reduce(sq, op=dist.ReduceOp.SUM, group=mesh.ep_group)
        # ZeRO's norm is of loss-scaled gradients (scale 1 in fp32 and bf16).
        return (norm.square() + sq * float(getattr(zero, "loss_scale", 1.0)) ** 2).sqrt()

    zero.scaled_global_norm = scaled_global_norm
