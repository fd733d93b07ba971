"""GPU suite, part 1: expert backends against a float64 reference (docs/gpu.md).

Shape legend: N rows sorted by expert, D model dim, E experts, F expert ffn dim.

Each case draws fresh inputs with uneven loads and idle experts, runs every backend's forward and
backward on the device in fp32 and bf16, and compares y, dx, dw1, dw3 and dw2 with the same
function computed in float64 on the CPU from the same (dtype-rounded) inputs: an oracle that
shares no kernel with the device. Per tensor: ‖got − ref‖ / ‖ref‖ of the worst expert (its rows
of y and dx, its slice of the weight gradients) against the dtype's tolerance, and the largest
absolute difference. An entry passes when every tensor is within tolerance,
nothing is NaN, and idle experts' weight gradients are exactly zero.

    pass         within tolerance
    fail         ran and disagrees, or a kernel that must exist (grouped GEMM in bf16 on a CUDA
                 GPU of compute capability >= 8.0) raised: the suite's parity is then false
    unsupported  the kernel raised where it is optional (fp32 grouped GEMM, CPU)
"""
from __future__ import annotations

import torch

from models.moe.backends import BACKENDS, _megablocks_importable, _torch_grouped_mm
from trainer.datasets_io import one_line

# The worst expert's ‖got − ref‖ / ‖ref‖. fp32: ~3e-7 in true fp32 arithmetic, ~3e-4 if a kernel
# uses tf32 (reported, not failed); bf16: rounding of the operands and of the F-wide intermediates,
# ~4e-3 (the loop and grouped GEMM on the CPU, 2.13), so 1e-2 leaves a margin of 2.5.
TOLERANCE = {torch.float32: 1e-3, torch.bfloat16: 1e-2}
NAMES = ("y", "dx", "dw1", "dw3", "dw2")


def cases(smoke: bool) -> list[dict]:
    """(name, D, F, rows per expert): uneven loads, idle experts, group ends off 16-row boundaries."""
    if smoke:
        return [dict(name="uneven", D=64, F=96, counts=[37, 0, 70, 5, 0, 33, 1, 19])]
    return [dict(name="uneven_E8", D=1024, F=2048, counts=[611, 0, 1290, 37, 0, 1024, 1, 733]),
            dict(name="skewed_E32", D=512, F=768,
                 counts=[2900, 0, 0, 5, 17] + [0] * 10 + [64 * i + 3 for i in range(17)])]


def reference(x, ws, dy, counts):
    """y and the gradients of (x, w1, w3, w2) in float64 on the CPU, expert by expert."""
    x, dy = x.detach().cpu().double().requires_grad_(), dy.cpu().double()
    ws = [w.detach().cpu().double().requires_grad_() for w in ws]
    w1, w3, w2 = ws
    outs, start = [], 0
    for e, n in enumerate(counts):
        rows = x[start:start + n]
        outs.append((torch.nn.functional.silu(rows @ w1[e].T) * (rows @ w3[e].T)) @ w2[e].T)
        start += n
    y = torch.cat(outs)
    y.backward(dy)
    return [y.detach(), x.grad] + [w.grad for w in ws]


def make_inputs(case: dict, device, dtype, seed: int):
    """x, [w1, w3, w2], dy (fresh draws, in `dtype` on `device`) and the rows per expert."""
    gen = torch.Generator().manual_seed(seed)
    E, N, D, F = len(case["counts"]), sum(case["counts"]), case["D"], case["F"]
    x = torch.randn(N, D, generator=gen)
    ws = [torch.randn(E, F, D, generator=gen) / D ** 0.5, torch.randn(E, F, D, generator=gen) / D ** 0.5,
          torch.randn(E, D, F, generator=gen) / F ** 0.5]
    dy = torch.randn(N, D, generator=gen)
    to = lambda t: t.to(device, dtype)
    return to(x), [to(w) for w in ws], to(dy), torch.tensor(case["counts"], device=device)


def run_backend(name: str, x, ws, dy, counts) -> list[torch.Tensor]:
    """y, dx, dw1, dw3, dw2 of one forward + backward of backend `name`."""
    x = x.clone().requires_grad_()
    ws = [w.clone().requires_grad_() for w in ws]
    y = BACKENDS[name](x, counts, *ws)
    y.backward(dy)
    return [y.detach(), x.grad] + [w.grad for w in ws]


def _per_expert(t: torch.Tensor, counts: list[int], rows: bool) -> list[torch.Tensor]:
    """The parts of `t` that belong to each busy expert: its rows (y, dx) or its slice (dw)."""
    if rows:
        return [p for p, n in zip(t.split(counts), counts) if n]
    return [t[e] for e, n in enumerate(counts) if n]


def compare(got: list[torch.Tensor], want: list[torch.Tensor], counts: list[int], tol: float) -> dict:
    """Errors per tensor, idle-expert gradients, and the verdict. The relative error is the worst
    busy expert's ‖got − ref‖ / ‖ref‖: a kernel wrong on one group is not averaged away."""
    rel, max_abs = {}, {}
    for name, g, w in zip(NAMES, got, want):
        g = g.detach().cpu().double()
        parts = zip(_per_expert(g, counts, name in ("y", "dx")), _per_expert(w, counts, name in ("y", "dx")))
        errs = [float((a - b).norm() / b.norm().clamp_min(1e-30)) for a, b in parts]
        # max() drops a NaN that is not first (nan > x is False): a NaN expert would pass
        rel[name] = float("nan") if any(e != e for e in errs) else max(errs)
        max_abs[name] = float((g - w).abs().max())
    idle = [e for e, n in enumerate(counts) if n == 0]
    idle_zero = all(int(torch.count_nonzero(dw[idle])) == 0 for dw in got[2:])
    ok = idle_zero and all(r <= tol for r in rel.values())  # a NaN compares False: fails
    return {"status": "pass" if ok else "fail", "rel_err": rel, "max_abs": max_abs,
            "idle_grads_zero": idle_zero}


def backends_to_check(device: torch.device) -> list[str]:
    names = ["loop"]
    if _torch_grouped_mm() is not None:
        names.append("grouped_mm")
    if device.type == "cuda" and _megablocks_importable():
        names.append("megablocks")
    return names


def must_run(name: str, device: torch.device, dtype: torch.dtype) -> bool:
    """Whether a kernel that raises fails the suite (not merely 'unsupported')."""
    if name == "loop":
        return True
    return (name == "grouped_mm" and device.type == "cuda" and dtype == torch.bfloat16
            and torch.cuda.get_device_capability(device) >= (8, 0))


def run_parity(device: torch.device, smoke: bool, log) -> dict:
    """Every backend x dtype x case against the float64 reference; see the module docstring."""
    entries = []
    for i, case in enumerate(cases(smoke)):
        for dtype in (torch.float32, torch.bfloat16):
            x, ws, dy, counts = make_inputs(case, device, dtype, seed=100 + i)
            want = reference(x, ws, dy, case["counts"])
            for name in backends_to_check(device):
                entry = {"case": case["name"], "backend": name, "dtype": str(dtype).replace("torch.", ""),
                         "tolerance": TOLERANCE[dtype]}
                try:
                    got = run_backend(name, x, ws, dy, counts)
                    if device.type == "cuda":
                        torch.cuda.synchronize(device)
                    entry.update(compare(got, want, case["counts"], TOLERANCE[dtype]))
                except Exception as e:  # noqa: BLE001 - an absent or broken kernel, reported
                    entry["status"] = "fail" if must_run(name, device, dtype) else "unsupported"
                    entry["error"] = one_line(e)
                entries.append(entry)
                worst = max(entry.get("rel_err", {}).values(), default=float("nan"))
                log(f"  parity {entry['case']:11s} {name:10s} {entry['dtype']:8s} {entry['status']:11s} "
                    f"max rel err {worst:.2e} (tol {entry['tolerance']:.0e})" + (f"  {entry['error']}"
                                                                                if "error" in entry else ""))
    megablocks = ("checked" if any(e["backend"] == "megablocks" for e in entries) else
                  "not installed: it pins an older torch and is not on the GPU box" if device.type == "cuda"
                  else "CUDA only")
    return {"ok": all(e["status"] != "fail" for e in entries), "reference": "float64 on the CPU",
            "metric": "|got - ref| / |ref| of the worst expert, per tensor", "megablocks": megablocks, "entries": entries}
