"""Pipeline parallelism: split a model into stages and run them with torch.distributed.pipelining.

The model provides `model.pipeline_stage(layer_ids, first, last)`: a module that runs some of its
layers (and the embedding on the first stage, the head on the last), sharing the model's
parameters under the full model's names; and `model.pipeline_io(microbatch, seq_len)`: the shapes
at the stage boundaries. Which stages a pp rank holds is parallel/config.py's `rank_stage_ids`.
Everything distributed lives here:

    stage_layer_counts(...)   layers per stage: explicit (parallel.pp_layers) or balanced by the
                              FLOPs per token of each layer (active parameters: routed experts count
                              top_k/E) with the output head on the last stage
    build_pipeline(...)       this rank's stages as `PipelineStage`s over the pp group and the
                              schedule from the recipe; returns a `Pipeline`

One optimizer step with pp > 1 (trainer/step.py):
    1. for each micro step (gradient accumulation), `Pipeline.step(inputs, targets)`: the first
       stage splits the batch into parallel.pp_microbatches microbatches, activations go forward
       and gradients backward between neighbouring stages by send/recv over the pp group in the
       schedule's order; the last stage computes the loss of each microbatch
    2. MoE aux losses: each layer attaches its aux-loss gradient inside its own stage's graph
       (models/moe AttachAuxLoss), scaled 1/(microbatches·accumulation) like the LM loss, so the
       summed gradient is exactly that of the non-pipelined run accumulating the same microbatches
    3. `sync_replicated_grads` (dp) and `sync_expert_grads` (edp); `clip_grad_norm` sums the
       squared norm over the pp group too
    4. the last stage's loss is broadcast over the pp group for logging
Gradients are never rescaled by the schedule (scale_grads=False): the loss function carries the
1/(microbatches·accumulation) factor, so accumulation over several `step` calls stays exact.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist
from torch import nn

from models.moe import is_expert_param
from parallel.config import (V_SCHEDULES, ParallelConfig, num_pp_stages, pp_microbatches, rank_stage_ids,
                             stage_owners)
from parallel.mesh import ParallelMesh


def _schedule_class(name: str):
    from torch.distributed.pipelining import schedules as S

    return {"gpipe": S.ScheduleGPipe, "1f1b": S.Schedule1F1B,
            "interleaved_1f1b": S.ScheduleInterleaved1F1B, "zbv": S.ScheduleZBVZeroBubble,
            "dualpipev": S.ScheduleDualPipeV}[name]


def _stage_takes_grad_shapes() -> bool:
    """Whether `PipelineStage` takes the gradients' shapes (`input_grads`, `output_grads`: torch
    2.13). torch 2.11 has no such arguments and makes them the shapes of the stage's inputs and
    outputs, which is what they are here."""
    import inspect

    from torch.distributed.pipelining import PipelineStage

    return "input_grads" in inspect.signature(PipelineStage.__init__).parameters


@functools.cache
def zero_bubble_works() -> bool:
    """Whether this torch runs the weight-gradient pass of zbv and dualpipev through our custom
    autograd nodes (the MoE backends, the aux loss): a weight pass over two parameter groups that
    share a custom node. torch 2.11's frees that node with the first group and fails on the second
    (`'_input_metadata' is invalid`); torch 2.13's works."""
    from torch.distributed.pipelining._backward import stage_backward_input, stage_backward_weight

    class Scale(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, w):
            ctx.save_for_backward(x, w)
            return x * w

        @staticmethod
        def backward(ctx, grad):
            x, w = ctx.saved_tensors
            return grad * w, grad * x

    w1, w2 = nn.Parameter(torch.ones(2)), nn.Parameter(torch.ones(2))
    x = torch.ones(2, requires_grad=True)
    y = Scale.apply(Scale.apply(x * 1.0, w1), w2) * 3
    try:
        _, groups = stage_backward_input([y], [torch.ones(2)], [x], [w1, w2])
        stage_backward_weight([w1, w2], groups)
    except RuntimeError:
        return False
    return w1.grad is not None and w2.grad is not None


def layer_costs(model: nn.Module, moe_cfg) -> tuple[list[float], float]:
    """FLOPs per token of each layer, in units of multiply-adds (its active parameters), and of
    the output head. Works on a meta-device model, and after expert parallelism has sharded the
    experts: a token uses top_k experts' worth of an expert tensor (dim 0 the experts), however
    many of them this rank holds."""
    costs = []
    for block in model.layers.values():
        cost = 0.0
        for name, p in block.named_parameters():
            cost += p.numel() // p.shape[0] * moe_cfg.top_k if is_expert_param(name) else p.numel()
        costs.append(cost)
    head = model.output_weight.numel()
    return costs, float(head)


def balanced_counts(costs: list[float], num_stages: int, last_extra: float = 0.0) -> list[int]:
    """Contiguous split of `costs` into `num_stages` non-empty stages minimising the largest stage
    cost (the last stage also pays `last_extra`); exact, by dynamic programming."""
    n = len(costs)
    if not 1 <= num_stages <= n:
        raise ValueError(f"cannot split {n} layers into {num_stages} non-empty stages")
    prefix = [0.0]
    for c in costs:
        prefix.append(prefix[-1] + c)
    inf = float("inf")
    # best[s][i]: smallest max-stage cost for the first i layers in s stages; cut[s][i]: start of the last
    best = [[inf] * (n + 1) for _ in range(num_stages + 1)]
    cut = [[0] * (n + 1) for _ in range(num_stages + 1)]
    best[0][0] = 0.0
    for s in range(1, num_stages + 1):
        for i in range(s, n - (num_stages - s) + 1):
            extra = last_extra if s == num_stages else 0.0
            for j in range(s - 1, i):
                value = max(best[s - 1][j], prefix[i] - prefix[j] + extra)
                if value < best[s][i]:
                    best[s][i], cut[s][i] = value, j
    counts, i = [], n
    for s in range(num_stages, 0, -1):
        j = cut[s][i]
        counts.append(i - j)
        i = j
    return counts[::-1]


def stage_layer_counts(par: ParallelConfig, model: nn.Module, moe_cfg) -> list[int]:
    """Layers per pipeline stage (one entry per stage): parallel.pp_layers, or balanced by the
    layers' FLOPs per token (`model` may be on the meta device)."""
    if par.pp_layers:
        return list(par.pp_layers)
    costs, head = layer_costs(model, moe_cfg)
    return balanced_counts(costs, num_pp_stages(par), last_extra=head)


def stage_layer_ids(counts: list[int]) -> list[list[int]]:
    out, start = [], 0
    for n in counts:
        out.append(list(range(start, start + n)))
        start += n
    return out


@dataclass
class StageIO:
    """Shapes and dtypes (meta tensors) of one microbatch at the stage boundaries, from the
    model's `pipeline_io(microbatch, seq_len)`.

    inputs: the first stage's arguments; boundary: what every stage hands the next (activations
    whose gradient flows back); output: the last stage's output, the loss function's input.
    """

    inputs: tuple[torch.Tensor, ...]
    boundary: tuple[torch.Tensor, ...]
    output: torch.Tensor


@dataclass
class Pipeline:
    """This rank's part of the pipeline.

    Attributes:
        module: this rank's parameters (all of its stages), under the full model's names: build
            the optimizer on it, checkpoint it, read router statistics from it.
        stages: `torch.distributed.pipelining.PipelineStage`s of this rank.
        schedule: the schedule object (parallel.pp_schedule).
        stage_ids, num_stages, has_first, has_last, last_stage_rank (global rank holding the
        last stage in this rank's pp group).
    """

    module: nn.Module
    stages: list
    schedule: object
    stage_ids: list[int]
    num_stages: int
    microbatches: int
    loss_scale: float
    has_first: bool
    has_last: bool
    last_stage_rank: int
    group: dist.ProcessGroup
    stage_modules: list  # this rank's stage modules, in stage_ids order
    stage_rank: list[int]  # global rank holding each stage (in this rank's pp group)
    io: "StageIO"
    loss_fn: Callable

    def step(self, inputs: tuple[torch.Tensor, ...], target: torch.Tensor) -> torch.Tensor | None:
        """Forward + backward of one micro step (all its pipeline microbatches): `inputs` are the
        first stage's arguments, `target` the loss function's, both whole micro batches (split
        along dim 0 by the schedule). Returns the sum of the microbatch losses as given to
        backward (scaled) on the rank holding the last stage, else None."""
        losses: list[torch.Tensor] | None = [] if self.has_last else None
        # Contiguous, as the stage's static input shapes: torch 2.11 checks strides too, and a
        # batch of token windows is a strided view ([B, S] of [B, S + 1]).
        args = tuple(t.contiguous() for t in inputs) if self.has_first else ()
        self.schedule.step(*args, target=target if self.has_last else None, losses=losses,
                           return_outputs=False)
        return torch.stack([l.detach() for l in losses]).sum() if self.has_last else None

    @torch.no_grad()
    def forward_only(self, inputs: tuple[torch.Tensor, ...]) -> torch.Tensor | None:
        """The last stage's output for a whole batch, forward only, on the last stage's rank;
        None elsewhere.

        Not through the schedule (the multi-stage schedules replay their training order, backward
        included): the whole batch goes through the stages in order, 1) run the stages this rank
        holds, 2) send what crosses the stage boundary (`io.boundary`: the LLM's hidden states,
        the DiT's hidden states and conditioning) to the rank of the next stage, which 3) receives
        it (shapes from `io`, scaled to this batch) and goes on.
        """
        batch = inputs[0].shape[0]
        values: tuple = ()
        for s in range(self.num_stages):
            if s not in self.stage_ids:
                continue
            if s == 0:
                values = tuple(inputs)
            elif s - 1 not in self.stage_ids:  # 3. from the previous stage's rank
                values = tuple(torch.empty(batch, *m.shape[1:], dtype=m.dtype, device=inputs[0].device)
                               for m in self.io.boundary)
                for v in values:
                    dist.recv(v, src=self.stage_rank[s - 1], group=self.group)
            out = self.stage_modules[self.stage_ids.index(s)](*values)  # 1.
            values = out if isinstance(out, tuple) else (out,)
            if s + 1 < self.num_stages and s + 1 not in self.stage_ids:  # 2.
                for v, m in zip(values, self.io.boundary):
                    dist.send(v.to(m.dtype).contiguous(), dst=self.stage_rank[s + 1], group=self.group)
        return values[0] if self.has_last else None

    @torch.no_grad()
    def eval_loss(self, inputs: tuple[torch.Tensor, ...], target: torch.Tensor) -> torch.Tensor | None:
        """Mean loss of a batch, forward only, on the last stage's rank; None elsewhere."""
        out = self.forward_only(inputs)
        return self.loss_fn(out, target) if self.has_last else None

    @torch.no_grad()
    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        """The model's output for a whole batch on every rank of the pp group (e.g. each step of a
        diffusion sampler): `forward_only`, then 4) the last stage's rank broadcasts the output."""
        out = self.forward_only(inputs)
        if out is None:
            m = self.io.output
            out = torch.empty(inputs[0].shape[0], *m.shape[1:], dtype=m.dtype, device=inputs[0].device)
        out = out.to(self.io.output.dtype).contiguous()
        dist.broadcast(out, src=self.last_stage_rank, group=self.group)  # 4.
        return out

    def broadcast_from_last(self, value: torch.Tensor | None, device: torch.device) -> torch.Tensor:
        """The last stage's scalar on every rank of the pp group."""
        out = value.detach().reshape(()).to(torch.float32) if value is not None else \
            torch.zeros((), dtype=torch.float32, device=device)
        out = out.clone()
        dist.broadcast(out, src=self.last_stage_rank, group=self.group)
        return out


def build_pipeline(model: nn.Module, mesh: ParallelMesh, par: ParallelConfig,
                   loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], *, micro_batch_size: int,
                   grad_accum_steps: int = 1, seq_len: int = 0) -> Pipeline:
    """Split `model` (already on its device, experts already sharded) into this rank's stages.

    Args:
        model: a model with `pipeline_stage(layer_ids, first, last)`, `pipeline_io(microbatch,
            seq_len)`, `layers` (a ModuleDict) and `moe_cfg`.
        mesh: from `build_mesh`, with pp > 1.
        par: parallel.pp_* (schedule, microbatches, stages, layers per stage).
        loss_fn: (last stage output, targets) -> mean loss of one microbatch, unscaled.
        micro_batch_size, grad_accum_steps: the batch of one micro step, and the micro steps per
            optimizer step (the loss scale); seq_len: tokens per sequence (LLMs).
    """
    from torch.distributed.pipelining import PipelineStage

    if par.pp_schedule in V_SCHEDULES and not zero_bubble_works():
        raise RuntimeError(f"parallel.pp_schedule={par.pp_schedule}: this torch ({torch.__version__}) cannot run the "
                           "separate weight-gradient pass through the MoE layer's autograd functions; use 1f1b or "
                           "interleaved_1f1b, or torch >= 2.13")
    num_stages = num_pp_stages(par)
    layer_ids = stage_layer_ids(stage_layer_counts(par, model, model.moe_cfg))
    own = rank_stage_ids(mesh.pp_rank, par)
    m = pp_microbatches(par)
    scale = 1.0 / (m * grad_accum_steps)
    union = sorted(i for s in own for i in layer_ids[s])
    module = model.pipeline_stage(union, first=0 in own, last=num_stages - 1 in own)
    # Static shapes of what crosses each stage boundary (meta tensors: shapes only). Without them
    # torch infers shapes by running the first stage on the first real microbatch, a forward whose
    # router statistics and expert loads would be counted.
    io = StageIO(*model.pipeline_io(micro_batch_size // m, seq_len))
    received = tuple(t.clone().requires_grad_() for t in io.boundary)  # their gradient goes back
    stages = []
    for s in own:
        first, last = s == 0, s == num_stages - 1
        submodule = model.pipeline_stage(layer_ids[s], first=first, last=last)
        grads = {}
        if _stage_takes_grad_shapes():
            grads = dict(input_grads=tuple(None for _ in io.inputs) if first else io.boundary,
                         output_grads=None if last else io.boundary)
        stages.append(PipelineStage(submodule, s, num_stages, mesh.device, group=mesh.pp_group,
                                    input_args=io.inputs if first else received,
                                    output_args=io.output if last else io.boundary, **grads))

    def scaled_loss(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return loss_fn(output, target) * scale

    cls = _schedule_class(par.pp_schedule)
    if cls.__name__ in ("ScheduleGPipe", "Schedule1F1B"):
        schedule = cls(stages[0], m, loss_fn=scaled_loss, scale_grads=False)
    else:
        schedule = cls(stages, m, loss_fn=scaled_loss, scale_grads=False)
    # The global rank holding each stage in this rank's pp group (one member per pp_rank).
    stage_rank = [owner * mesh.dp + mesh.dp_rank for owner in stage_owners(par)]
    return Pipeline(module, stages, schedule, own, num_stages, m, scale, 0 in own, num_stages - 1 in own,
                    stage_rank[-1], mesh.pp_group, [st.submod for st in stages], stage_rank, io, loss_fn)
