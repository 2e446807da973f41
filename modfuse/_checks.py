"""Every user-facing argument check of modfuse, in one place.

All backends (compiled, reference, and later CUDA/Triton) go through these before they run, so a bad argument
gets the same clear message whichever backend would have run it: TypeError for a wrong dtype or type,
ValueError for a wrong shape, device, value or layout. The C++ kernels keep only short internal guards so that a
direct torch.ops.modfuse call cannot touch memory out of bounds.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

FLOAT32_MAX = float(torch.finfo(torch.float32).max)

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
MAX_MODALITIES = 16
MAX_SAMPLES = 64  # Op 4's samples form keeps K samples per element in registers on the GPU


def tensor(name: str, t, *, dims: Sequence[int] | int, dtypes=FLOAT_DTYPES) -> torch.Tensor:
    """A tensor with one of `dims` dimensions and one of `dtypes`."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    dims = (dims,) if isinstance(dims, int) else tuple(dims)
    if t.dim() not in dims:
        want = " or ".join(f"{d}-D" for d in dims)
        raise ValueError(f"{name} must be {want}, got shape {tuple(t.shape)}")
    if t.dtype not in dtypes:
        want = ", ".join(str(d).removeprefix("torch.") for d in dtypes)
        raise TypeError(f"{name} must have dtype {want}; got {str(t.dtype).removeprefix('torch.')}")
    return t


def tensor_list(name: str, tensors) -> list[torch.Tensor]:
    """A non-empty list or tuple of float tensors of any shapes, all of the first one's dtype and device."""
    if isinstance(tensors, torch.Tensor) or not isinstance(tensors, (list, tuple)):
        raise TypeError(f"{name} must be a list or tuple of torch.Tensor, got {type(tensors).__name__}")
    if not tensors:
        raise ValueError(f"{name} must hold at least one tensor, got an empty {type(tensors).__name__}")
    for i, t in enumerate(tensors):
        tensor(f"{name}[{i}]", t, dims=range(0, 65))
        first = tensors[0]
        if t.dtype != first.dtype:
            raise TypeError(
                f"{name}[{i}] has dtype {str(t.dtype).removeprefix('torch.')} but {name}[0] has "
                f"{str(first.dtype).removeprefix('torch.')}: one call takes one dtype (call once per dtype)"
            )
        if t.device != first.device:
            raise ValueError(
                f"{name}[{i}] is on {t.device} but {name}[0] is on {first.device}: one call takes one device"
            )
    return list(tensors)


def same_device(reference_name: str, reference: torch.Tensor, **others: torch.Tensor) -> None:
    for name, t in others.items():
        if t.device != reference.device:
            raise ValueError(
                f"{name} is on {t.device} but {reference_name} is on {reference.device}: "
                "all tensor arguments must be on one device"
            )


def shape(name: str, t: torch.Tensor, expected: Sequence[int], meaning: str) -> None:
    if tuple(t.shape) != tuple(expected):
        raise ValueError(f"{name} must have shape {meaning} = {tuple(expected)}, got {tuple(t.shape)}")


def contiguous_output(name: str, t: torch.Tensor) -> None:
    """In-place targets are written through their data pointer: a strided view cannot be taken."""
    if not t.is_contiguous():
        raise ValueError(
            f"{name} is written in place and must be contiguous (got strides {t.stride()}); "
            "pass a contiguous tensor, e.g. a view of a flat gradient bank"
        )


def modalities(name: str, M: int) -> None:
    if not 1 <= M <= MAX_MODALITIES:
        raise ValueError(f"{name} must hold between 1 and {MAX_MODALITIES} modalities along dim 0, got {M}")


def positive(name: str, value, *, allow_inf: bool = False) -> float:
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a real number, got {value!r}") from None
    if not value > 0 or (value == float("inf") and not allow_inf):
        bound = "> 0" if allow_inf else "finite and > 0"
        raise ValueError(f"{name} must be {bound}, got {value}")
    return value


def _round_to_float32(x: float) -> float:
    """x rounded to the nearest float32 (ties to even; inf past its range), in plain Python arithmetic so that
    torch.compile evaluates it at trace time (ctypes/numpy/a tensor would break the graph)."""
    if x == 0 or not math.isfinite(x):
        return x
    ulp_exp = max(math.frexp(x)[1] - 24, -149)  # float32: 24 significant bits, subnormals down to 2**-149
    r = math.ldexp(round(math.ldexp(x, -ulp_exp)), ulp_exp)
    return math.copysign(math.inf, r) if abs(r) > FLOAT32_MAX else r


def opinion_param(name: str, value: float, dtype: torch.dtype, *, subnormal_ok: bool) -> None:
    """Op 4's kappa and eps must stay positive and finite in the accumulation dtype (issue 14 item 4). float32
    (for float32, float16 and bfloat16 inputs) gives eps [1.4e-45, 3.4e38]; kappa needs a finite 1 / kappa (the
    reference forms kappa / (e + kappa) through a reciprocal), so [1.18e-38, 3.4e38]. A smaller value would become
    0 or give inf / NaN. float64 holds every positive finite number."""
    if dtype == torch.float64:
        return
    info = torch.finfo(torch.float32)
    smallest = info.smallest_normal * info.eps if subnormal_ok else info.smallest_normal
    as_float32 = _round_to_float32(float(value))
    if not smallest <= as_float32 < float("inf"):
        raise ValueError(
            f"{name} = {value} becomes {as_float32} in float32, the accumulation dtype of "
            f"{str(dtype).removeprefix('torch.')} inputs: pass {name} in [{smallest:.3g}, "
            f"{info.max:.3g}] (or float64 inputs)"
        )


def offsets(off, D: int) -> torch.Tensor:
    """Segment boundaries: int64 [P + 1], 0 = offsets[0] <= offsets[1] <= ... <= offsets[P] = D.

    Returned as a contiguous int64 CPU tensor (the kernels read segment bounds on the host).
    """
    if not isinstance(off, torch.Tensor):
        try:
            off = torch.as_tensor(off, dtype=torch.int64)
        except (TypeError, ValueError, RuntimeError):
            raise TypeError(f"offsets must be an int64 tensor or a sequence of ints, got {off!r}") from None
    if off.dtype != torch.int64:
        raise TypeError(f"offsets must have dtype int64, got {str(off.dtype).removeprefix('torch.')}")
    if off.dim() != 1 or off.numel() < 2:
        raise ValueError(f"offsets must be 1-D with P + 1 >= 2 entries, got shape {tuple(off.shape)}")
    off = off.detach().to("cpu").contiguous()
    if int(off[0]) != 0:
        raise ValueError(f"offsets must start at 0, got offsets[0] = {int(off[0])}")
    if int(off[-1]) != D:
        raise ValueError(
            f"offsets must end at D = {D} (the length of the flattened dimension), got offsets[-1] = {int(off[-1])}"
        )
    steps = off[1:] - off[:-1]
    if bool((steps < 0).any()):
        p = int(torch.nonzero(steps < 0)[0])
        raise ValueError(
            f"offsets must not decrease: offsets[{p}] = {int(off[p])} > offsets[{p + 1}] = {int(off[p + 1])}"
        )
    return off


def counts(n, M: int, device, dtype) -> torch.Tensor:
    """Sample counts n[M], every one >= 2 (a sample variance needs two samples)."""
    if isinstance(n, torch.Tensor):
        if n.dtype.is_complex or n.dtype == torch.bool:
            raise TypeError(f"n must hold real sample counts, got dtype {str(n.dtype).removeprefix('torch.')}")
        host = n.detach().to("cpu", torch.float64)
    else:
        try:
            host = torch.as_tensor(n, dtype=torch.float64)
        except (TypeError, ValueError, RuntimeError):
            raise TypeError(f"n must be a tensor or sequence of sample counts, got {n!r}") from None
    if host.dim() != 1 or host.numel() != M:
        raise ValueError(f"n must have shape [M] = ({M},) (one count per modality of S1), got {tuple(host.shape)}")
    bad = ~(host >= 2) | ~torch.isfinite(host)
    if bool(bad.any()):
        m = int(torch.nonzero(bad)[0])
        raise ValueError(
            f"n[{m}] = {float(host[m])}: every modality needs a finite count n >= 2 "
            "(a sample variance needs at least two samples)"
        )
    return host.to(device=device, dtype=dtype)


def finite_per_modality(name: str, t: torch.Tensor) -> None:
    """check_finite=True: raise naming the first modality (index along dim 0) that holds NaN or Inf."""
    bad = ~torch.isfinite(t).reshape(t.shape[0], -1).all(dim=1)
    if bool(bad.any()):
        m = int(torch.nonzero(bad)[0])
        raise ValueError(
            f"{name} has NaN or Inf values in modality {m} (index {m} along dim 0); "
            "check_finite=True rejects non-finite gradients"
        )
