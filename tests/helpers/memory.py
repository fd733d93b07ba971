"""CPU memory of tensors without CUDA: the bytes glibc's allocator has handed out (`mallinfo2`:
in-use heap blocks plus mmapped ones), where torch's CPU allocator puts every tensor. Python
objects count too, but at the sizes measured here tensors dominate.

    in_use()        bytes in use now (None where glibc's mallinfo2 is missing)
    PeakMeter()     context: the largest in_use() seen after any tensor operation inside it,
                    autograd's backward included (a TorchDispatchMode samples after every op)
"""
from __future__ import annotations

import ctypes
import ctypes.util

from torch.utils._python_dispatch import TorchDispatchMode


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                     "fsmblks", "uordblks", "fordblks", "keepcost")]


def _mallinfo2():
    try:
        fn = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallinfo2
    except (OSError, AttributeError):
        return None
    fn.restype = _MallInfo2
    return fn


_MALLINFO2 = _mallinfo2()


def in_use() -> int | None:
    """Bytes the C allocator has handed out and not taken back: small blocks and mmapped ones."""
    if _MALLINFO2 is None:
        return None
    info = _MALLINFO2()
    return info.uordblks + info.hblkhd


class PeakMeter(TorchDispatchMode):
    """`with PeakMeter() as meter:` ... then `meter.peak`: the most bytes in use after any op."""

    def __enter__(self):
        self.peak = in_use()
        return super().__enter__()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.peak = max(self.peak, in_use())
        return out
