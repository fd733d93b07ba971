"""Layout-independent initial weights: one seed gives bitwise the same initial model on 1 rank and
under any expert, pipeline or fully sharded data-parallel layout.

Every parameter is drawn from generators keyed by (seed, the parameter's name in the whole model,
a block of its dim-0 rows), never from a global RNG stream, so a value does not depend on which
other tensors a rank holds or in which order they are filled:
    expert tensors (dim 0 = the expert index)   one block per expert, keyed by the GLOBAL expert
                                                 index (a rank holding experts [8, 16) under
                                                 expert parallelism draws exactly those)
    every other tensor                           blocks of `rows_per_block(shape)` dim-0 rows
A rank holding a shard of a tensor (fully sharded data parallelism, dim 0 or dim 1) draws only the
blocks its rows fall in, so memory stays bounded by the largest block, not the model. Which part of
a tensor a rank holds is parallel/'s business: it passes `local_part` (models/ never imports
torch.distributed).

Modules set their weights in `init_weights(init, ...)` through an `Init`: `init.normal(t, std)`,
`init.uniform(t, a, b)`, `init.xavier_uniform(t)`, `init.zeros(t)`, `init.ones(t)`. Tensors on
the meta device (parts of the model another rank holds) are skipped.
"""
from __future__ import annotations

import hashlib
import math
from typing import Callable

import torch
from torch import nn

BLOCK_ELEMENTS = 1 << 20  # a block of rows holds about this many values (a few MB in fp32)
# (tensor) -> (the local tensor to write, the tensor's global shape, offset of the local part per dim)
LocalPart = Callable[[torch.Tensor], tuple[torch.Tensor, tuple[int, ...], tuple[int, ...]]]


def whole_tensor(t: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...], tuple[int, ...]]:
    """The `LocalPart` of an unsharded tensor: all of it."""
    return t, tuple(t.shape), (0,) * t.ndim


def rows_per_block(shape: tuple[int, ...]) -> int:
    """Dim-0 rows per generator block of a non-expert tensor: a function of the global shape only."""
    row = math.prod(shape[1:]) if len(shape) > 1 else 1
    return max(1, BLOCK_ELEMENTS // max(row, 1))


def _seed_of(seed: int, name: str, block: int) -> int:
    digest = hashlib.blake2b(f"{seed}/{name}/{block}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


class Init:
    """Sets tensors of `model` from their names (see the module docstring).

    Args:
        model: the whole model (its parameter names are the keys; parts of it may be on meta).
        seed: the run's seed (train.seed).
        local_part: where each tensor's local part sits in its global tensor (default: unsharded).
    """

    def __init__(self, model: nn.Module, seed: int, local_part: LocalPart = whole_tensor):
        self.seed, self.local_part = seed, local_part
        self.names: dict[int, str] = {}
        self.expert_offset: dict[int, int] = {}  # expert tensors: global index of local expert 0
        for prefix, module in model.named_modules(remove_duplicate=False):
            offset = getattr(module, "expert_offset", 0) if getattr(module, "is_expert_module", False) else None
            for name, t in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
                self.names.setdefault(id(t), f"{prefix}.{name}" if prefix else name)
            if offset is not None:  # every tensor below an expert module has the expert index as dim 0
                for t in module.parameters():
                    self.expert_offset[id(t)] = offset

    # -- what modules call ---------------------------------------------------------------------

    def normal(self, t: torch.Tensor, std: float, mean: float = 0.0) -> None:
        self._draw(t, lambda g, shape: torch.randn(shape, generator=g).mul_(std).add_(mean))

    def uniform(self, t: torch.Tensor, a: float, b: float) -> None:
        self._draw(t, lambda g, shape: torch.rand(shape, generator=g).mul_(b - a).add_(a))

    def xavier_uniform(self, t: torch.Tensor) -> None:
        """U(-√(6/(fan_in + fan_out)), +...) of the [shape[0], rest] matrix (as nn.init on 2-D)."""
        shape = self.local_part(t)[1]
        fan_out, fan_in = shape[0], math.prod(shape[1:])
        bound = math.sqrt(6.0 / (fan_in + fan_out))
        self.uniform(t, -bound, bound)

    def zeros(self, t: torch.Tensor) -> None:
        self._fill(t, 0.0)

    def ones(self, t: torch.Tensor) -> None:
        self._fill(t, 1.0)

    # -- how ------------------------------------------------------------------------------------

    def _fill(self, t: torch.Tensor, value: float) -> None:
        local = self.local_part(t)[0]
        if not local.is_meta:
            with torch.no_grad():
                local.fill_(value)

    @torch.no_grad()
    def _draw(self, t: torch.Tensor, sample: Callable[[torch.Generator, tuple[int, ...]], torch.Tensor]) -> None:
        local, shape, offset = self.local_part(t)
        if local.is_meta or local.numel() == 0:
            return
        name = self.names[id(t)]
        first, count = offset[0], local.shape[0]
        expert_offset = self.expert_offset.get(id(t))
        rows = 1 if expert_offset is not None else rows_per_block(shape)
        pieces = []
        for block in range(first // rows, (first + count - 1) // rows + 1):
            key = block + expert_offset if expert_offset is not None else block
            generator = torch.Generator().manual_seed(_seed_of(self.seed, name, key))
            block_rows = min(rows, shape[0] - block * rows)
            pieces.append(sample(generator, (block_rows, *shape[1:])))
        values = torch.cat(pieces) if len(pieces) > 1 else pieces[0]
        start = first - (first // rows) * rows
        index = [slice(start, start + count)] + [slice(o, o + n) for o, n in zip(offset[1:], local.shape[1:])]
        local.copy_(values[tuple(index)])


def initialize(model: nn.Module, seed: int, local_part: LocalPart = whole_tensor) -> None:
    """Every weight of `model` from `seed`: the model's `init_weights(init)`, then the adapters a
    PEFT method added (modules with `init_adapter(init)`)."""
    init = Init(model, seed, local_part)
    model.init_weights(init)
    for module in model.modules():
        if hasattr(module, "init_adapter"):
            module.init_adapter(init)


def seed_from_global_rng() -> int:
    """A seed drawn from torch's global generator: `torch.manual_seed(s)` then decides the weights."""
    return int(torch.randint(0, 2**62, (1,)).item())
