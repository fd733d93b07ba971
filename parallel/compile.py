"""torch.compile applied from outside, after activation checkpointing (torchtitan's order): each
block of `model.layers` is compiled on its own, so identical blocks share one compiled graph.

`nn.Module.compile` keeps parameter names, state dicts and hooks as they are. A compiled region
must not hold a region checkpointed on its own inside it: torch's composable checkpoint then
saves other tensors in the recompute than in the forward, and backward fails ("A different
number of tensors was saved", torch 2.13). A block that is itself checkpointed (`block` mode) is
fine, its hooks run inside its compiled call; under `moe_ffn` the routed experts are checkpointed
inside each block, so the block is compiled part by part around them instead.
"""
from __future__ import annotations

from torch import nn


def compile_blocks(model: nn.Module, checkpointed: list[nn.Module], backend: str = "inductor") -> int:
    """Compile every block of `model.layers` in place; returns how many modules were compiled.

    Args:
        model: a model with `layers` (both families), activation checkpointing already applied.
        checkpointed: the modules that checkpointing wraps (`parallel.recompute.checkpointed_modules`).
        backend: torch.compile's backend ("inductor"; "aot_eager" traces without generating code).
    """
    inner = {id(m) for m in checkpointed}
    return sum(_compile_around(block, inner, backend) for block in model.layers.values())


def _compile_around(module: nn.Module, checkpointed: set[int], backend: str) -> int:
    """Compile `module`, or, when a checkpointed module lies strictly inside it, its children."""
    if not any(id(m) in checkpointed for m in module.modules() if m is not module):
        module.compile(backend=backend)
        return 1
    return sum(_compile_around(child, checkpointed, backend) for child in module.children())
