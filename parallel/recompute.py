"""Activation checkpointing ("recompute"): parts of the model keep only their inputs in forward and
run their forward again in backward, applied from outside with torch's composable checkpoint.

Modes (`parallel.activation_checkpoint`):
    none      every activation is kept
    block     every `activation_checkpoint_every`-th block of `model.layers` (layers 0, k, 2k, ...;
              the LLM's `Block`, the DiT's `DiTBlock`): only the block's inputs are kept
    moe_ffn   the routed experts of every MoE layer (`GroupedExperts`): their SwiGLU intermediates,
              the largest activations of an MoE layer, are recomputed from the expert-sorted rows;
              no communication runs inside them

`torch.distributed._composable.checkpoint` works through forward hooks, not a wrapper module, so
parameter names stay what they were: checkpoints, DDP, FSDP and PEFT find parameters by name, and
pipeline stages, which share the model's blocks, are checkpointed with them. The backward always
runs on the original graph; a recompute only re-creates the tensors it saved.

Recomputing a block re-runs its MoE layers. Two things must then not happen twice:
    statistics  the MoE layer records router statistics and step loads only outside a recompute
                (`models.moe.is_recomputing`)
    all-to-alls an `ExchangeTape` per checkpointed block call: its all-to-all dispatchers record
                what they received in forward and its recompute replays it without communicating
                (parallel/expert_parallel.py), so a step issues exactly the all-to-alls it issues
                without recompute; the tape lives with that call's autograd graph

The composable checkpoint re-creates a region's tensors once per backward pass and cannot run its
recompute a second time, so the zero-bubble schedules (zbv, dualpipev), whose input- and
weight-gradient passes are two backward passes over one graph, are refused by the config rules.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.distributed._composable import checkpoint

from models.moe import moe_layers
from parallel.config import ParallelConfig, checkpointed_layers
from parallel.expert_parallel import AllToAllDispatcher


def apply_activation_checkpointing(model: nn.Module, par: ParallelConfig) -> nn.Module:
    """Checkpoint the parts of `model` that `par.activation_checkpoint` names (in place; returns
    the model). Call after expert parallelism and before pipeline splitting or DDP wrapping.

    Args:
        model: a model with `layers`, a ModuleDict of blocks keyed by layer index (both families).
        par: the parallel section (activation_checkpoint, activation_checkpoint_every).
    """
    for module in checkpointed_modules(model, par):
        if par.activation_checkpoint == "block":
            checkpoint(module, context_fn=lambda block=module: _tape_contexts(block))
        else:
            checkpoint(module)
    return model


def checkpointed_modules(model: nn.Module, par: ParallelConfig) -> list[nn.Module]:
    """The modules that `apply_activation_checkpointing` checkpoints: every k-th block (block), the
    routed experts of every MoE layer (moe_ffn), or none."""
    if par.activation_checkpoint == "block":
        return [model.layers[str(i)] for i in checkpointed_layers(par, len(model.layers))]
    if par.activation_checkpoint == "moe_ffn":
        return [layer.experts for layer in moe_layers(model)]
    return []


# -- the exchanges of a checkpointed forward, for its recompute ----------------------------------------


@dataclass
class Record:
    """What one all-to-all dispatcher call of a checkpointed forward exchanged."""

    send_PCL: torch.Tensor  # step 2's counts sent: a recompute must route exactly the same
    recv_PCL: torch.Tensor  # step 2's counts received
    splits: list  # [send, recv] rows per peer and chunk, host ints (step 2's read-back)
    received: list[list[torch.Tensor]]  # per chunk: the rows step 3 received, then step 5's


class ExchangeTape:
    """The all-to-all dispatcher calls of one checkpointed forward, in call order.

    While the forward runs, the module's dispatchers `record` what they exchanged; while its
    recompute runs (in backward), they take the `next_record` each instead of exchanging: the same
    calls in the same order. One tape per call of a checkpointed module, kept by that call's
    checkpoint frame, so one per microbatch in flight however a pipeline schedule orders forwards
    and backwards, freed with the graph.

    Memory, per MoE layer of the module until its backward: the rows both token exchanges
    received, M·D·4 + N·D·b bytes (M rows received for the local experts and N sent, each about
    T·top_k; the dispatched rows are the fp32 MoE input, b the bytes of the experts' output, 2
    under bf16 autocast, else 4), plus the counts. Without checkpointing the graph keeps tensors
    of these sizes too; launch/plan.py counts them (`activation_bytes`).
    """

    def __init__(self):
        self.records: list[Record] = []
        self.replaying = False
        self._next = 0

    def start(self, replaying: bool) -> None:
        """Record from scratch (a forward), or replay from the first call on (a recompute)."""
        self.replaying, self._next = replaying, 0
        if not replaying:
            self.records.clear()

    def record(self, send_PCL: torch.Tensor, recv_PCL: torch.Tensor, splits: list,
               received: list[list[torch.Tensor]]) -> None:
        self.records.append(Record(send_PCL, recv_PCL, splits, received))

    def next_record(self) -> Record:
        if self._next >= len(self.records):
            raise RuntimeError("activation checkpointing: the recompute dispatches more often than the "
                               "forward it re-runs")
        self._next += 1
        return self.records[self._next - 1]


class _UseTape:
    """Context: the all-to-all dispatchers of `module` record into `tape` (the checkpointed
    forward) or replay it (its recompute) while it is entered."""

    def __init__(self, module: nn.Module, tape: ExchangeTape, replaying: bool):
        self.module, self.tape, self.replaying = module, tape, replaying
        self.dispatchers: list[AllToAllDispatcher] = []

    def __enter__(self) -> None:
        self.dispatchers = [layer.dispatcher for layer in moe_layers(self.module)
                            if isinstance(layer.dispatcher, AllToAllDispatcher)]
        self.tape.start(self.replaying)
        for dispatcher in self.dispatchers:
            dispatcher.tape = self.tape

    def __exit__(self, *exc) -> None:
        for dispatcher in self.dispatchers:
            dispatcher.tape = None


def _tape_contexts(module: nn.Module) -> tuple[_UseTape, _UseTape]:
    """checkpoint's `context_fn`, called once per forward of `module`: the contexts of that
    forward and of its recompute, sharing one new tape."""
    tape = ExchangeTape()
    return _UseTape(module, tape, replaying=False), _UseTape(module, tape, replaying=True)
