"""CPU memory of tensors without CUDA: the bytes glibc's allocator has handed out (`mallinfo2`:
in-use heap blocks plus mmapped ones), where torch's CPU allocator puts every tensor. Python
objects count too, but at the sizes measured here tensors dominate.

    in_use()        bytes in use now (None where glibc's mallinfo2 is missing)
    PeakMeter()     context: the largest in_use() seen after any tensor operation inside it,
                    autograd's backward included (a TorchDispatchMode samples after every op)
    PeakSampler()   PeakMeter plus a thread sampling in_use() every `interval_s`: it also sees
                    what is allocated outside torch ops (safetensors reads a tensor into a
                    buffer of its own) and inside a long op (torch releases the GIL in ops)
"""
from __future__ import annotations

import ctypes
import ctypes.util
import threading

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


class PeakSampler(PeakMeter):
    """`with PeakSampler() as meter:` ... then `meter.peak`: the most bytes in use after any op on
    this thread or at any sample of the background thread, whichever is larger."""

    def __init__(self, interval_s: float = 0.0005):
        super().__init__()
        self.interval_s = interval_s

    def __enter__(self):
        self._stop, self.sampled_peak = threading.Event(), in_use()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return super().__enter__()

    def __exit__(self, *exc):
        out = super().__exit__(*exc)
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.sampled_peak)
        return out

    def _sample(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.sampled_peak = max(self.sampled_peak, in_use())
