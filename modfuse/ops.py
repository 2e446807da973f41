"""Public functional ops of modfuse (docs/math.md, Ops 1-7).

Each function validates its arguments (modfuse/_checks.py), then runs on one backend:

- ``"auto"`` (default): CPU tensors run the fused C++ kernels; CUDA tensors run the CUDA kernels when this
  build has them (a torch with CUDA at build time), else the Triton kernels when triton is installed and has the
  op (Ops 1, 3, 4, 5), else the reference (with a one-time warning).
- ``"cuda"``: the CUDA kernels (csrc/cuda/*.cu); CUDA tensors and a CUDA build only.
- ``"triton"``: the Triton kernels (modfuse/triton/*.py) for segment_sq_norms, linear_moments,
  calibrated_aggregate and gram; CUDA tensors, or CPU tensors under TRITON_INTERPRET=1 (tests).
- ``"cpu"``: the fused C++ kernels (torch.ops.modfuse.*); CPU tensors only.
- ``"reference"``: modfuse.reference, docs/math.md in plain PyTorch (any device, slow, the test oracle).

Dtypes: float32, float16, bfloat16 and float64 everywhere. Arithmetic accumulates in float32 (float64 for
float64). Outputs are in the input dtype unless a function says otherwise.

Layout: read-only inputs may be non-contiguous (they are copied to contiguous memory first, which costs one
extra pass); tensors written in place must be contiguous.

NaN/Inf policy: by default non-finite inputs propagate to exactly the outputs they feed (for element-wise
outputs, the affected elements d; for reductions, the affected rows or segments) and nothing raises. With
``check_finite=True`` a function first scans its inputs and raises ValueError naming the first modality (row)
holding NaN or Inf; this costs one extra read of the inputs.

None of these ops is differentiable: they compute statistics of gradients.
"""

from __future__ import annotations

import warnings

import torch

from modfuse import _checks as check
from modfuse import reference

try:
    from modfuse import _C  # importing registers torch.ops.modfuse.*

    _IMPORT_ERROR: Exception | None = None
except ImportError as error:  # pragma: no cover - exercised only in a broken install
    _C = None
    _IMPORT_ERROR = error

BACKENDS = ("auto", "cuda", "triton", "cpu", "reference")
# Every op, by the name it has in every layer: torch.ops.modfuse.<op>, modfuse.reference.<op>, modfuse.ops.<op>.
OPS = (
    "segment_sq_norms",
    "tensor_sq_norms",
    "moments",
    "moments_accumulate_",
    "linear_moments",
    "calibrated_aggregate",
    "calibrated_aggregate_samples",
    "gram",
    "weighted_sum",
    "segment_scale_",
    "segment_moments",
)
_warned: set[str] = set()


def _compiled(op: str):
    """torch.ops.modfuse.<op>: one registration per op, whose CPU or CUDA kernel torch picks by device."""
    return lambda *args: getattr(torch.ops.modfuse, op)(*args)


def _triton(op: str):
    return lambda *args: getattr(torch.ops.modfuse_triton, op)(*args)


def _triton_segment_sq_norms(x, offsets):
    from modfuse.triton.segment_sq_norms import piece_tensors

    return torch.ops.modfuse_triton.segment_sq_norms(x, *piece_tensors(offsets, x.device))


def _written_into(out, result):
    """The reference's results with its aggregate written into `out` (when given), as the kernels do."""
    if out is not None:
        out.copy_(result[0])
    return result


# (op, backend) -> implementation, all called with the compiled op's arguments (the schema in csrc/ops.cpp), on
# inputs the public function below has already checked. "auto" resolves to one of these (_backend).
KERNELS = {
    **{(op, "cpu"): _compiled(op) for op in OPS},
    **{(op, "cuda"): _compiled(op) for op in OPS},
    **{(op, "reference"): getattr(reference, op) for op in OPS},
    # the reference takes offsets on the data's device, and seed/offset as the unsigned values the schema's bits hold
    ("segment_sq_norms", "reference"): lambda x, off: reference.segment_sq_norms(x, off.to(x.device)),
    ("segment_moments", "reference"): lambda x, off: reference.segment_moments(x, off.to(x.device)),
    ("segment_scale_", "reference"): lambda x, off, scale, noise_std, seed, offset: reference.segment_scale_(
        x, off.to(x.device), scale, noise_std, seed % 2**64, offset % 2**64
    ),
    ("calibrated_aggregate", "reference"): lambda *args: _written_into(
        args[-1], reference.calibrated_aggregate(*args[:-1])
    ),
    ("segment_sq_norms", "triton"): _triton_segment_sq_norms,
    ("linear_moments", "triton"): _triton("linear_moments"),
    ("calibrated_aggregate", "triton"): _triton("calibrated_aggregate"),
    ("gram", "triton"): _triton("gram"),
}
# Ops with a Triton kernel (modfuse/triton/<op>.py); every op has a CPU and a CUDA registration.
TRITON_OPS = tuple(op for op in OPS if (op, "triton") in KERNELS)


def _run(op: str, backend: str, device: torch.device, *args):
    """Run `op` on the backend that `backend` resolves to for tensors on `device`."""
    return KERNELS[op, _backend(backend, device, op)](*args)


def _cuda_built() -> bool:
    return _C is not None and bool(getattr(_C, "with_cuda", False))


def available_backends() -> list[str]:
    """The backends this build and machine can run: "cuda" (CUDA build and a GPU), "triton" (triton installed and
    a GPU, or TRITON_INTERPRET=1), "cpu" (the compiled extension loaded), and "reference" always."""
    from modfuse import triton as triton_backend

    out = []
    if _cuda_built() and torch.cuda.is_available():
        out.append("cuda")
    gpu_triton = torch.cuda.is_available() and triton_backend.runs_on(torch.device("cuda"))
    if gpu_triton or triton_backend.runs_on(torch.device("cpu")):
        out.append("triton")
    return out + (["cpu"] if _C is not None else []) + ["reference"]


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def _backend(backend: str, device: torch.device, op: str) -> str:
    """Resolve "auto" for `op` on `device`, and check that a forced backend can run it there."""
    from modfuse import triton as triton_backend

    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(map(repr, BACKENDS))}, got {backend!r}")
    if backend == "reference":
        return backend
    if backend == "triton":
        if op not in TRITON_OPS:
            raise ValueError(f"backend='triton' has no kernel for {op}; it covers {', '.join(TRITON_OPS)}")
        if not triton_backend.installed():
            raise RuntimeError("backend='triton' needs the triton package (pip install triton)")
        if not triton_backend.runs_on(device):
            raise ValueError(
                f"backend='triton' runs CUDA tensors (or CPU tensors under TRITON_INTERPRET=1), got tensors on {device}"
            )
        triton_backend.load()
        return backend
    if backend == "cuda":
        if device.type != "cuda":
            raise ValueError(f"backend='cuda' runs CUDA tensors only, got tensors on {device}")
        if not _cuda_built():
            raise RuntimeError(
                "backend='cuda': this build of modfuse._C has no CUDA kernels (it was built against a "
                "torch without CUDA); reinstall with a CUDA torch: pip install --no-build-isolation -e ."
            )
        return backend
    if _C is None:
        if backend == "cpu":
            raise RuntimeError(
                f"backend='cpu' needs the compiled extension modfuse._C, which failed to import "
                f"({_IMPORT_ERROR}); rebuild with `pip install --no-build-isolation -e .`"
            )
        _warn_once("no_C", f"modfuse._C is not available ({_IMPORT_ERROR}); using the slow reference backend")
        return "reference"
    if device.type == "cpu":
        return "cpu"
    if backend == "cpu":
        raise ValueError(f"backend='cpu' runs CPU tensors only, got tensors on {device}")
    if device.type == "cuda" and _cuda_built():
        return "cuda"
    if device.type == "cuda" and op in TRITON_OPS and triton_backend.installed():
        triton_backend.load()
        return "triton"
    _warn_once(
        f"device:{device.type}:{op}",
        f"modfuse has no compiled kernel for {op} on {device.type} tensors in this build; using the reference backend",
    )
    return "reference"


def _acc(dtype: torch.dtype) -> torch.dtype:
    return reference.accumulation_dtype(dtype)


# Op 1 ---------------------------------------------------------------------------------------------------------
def segment_sq_norms(x: torch.Tensor, offsets, *, check_finite: bool = False, backend: str = "auto") -> torch.Tensor:
    """Squared L2 norm of every segment of every row, in one pass.

    Args:
        x: [R, D] (for example one row per modality of a flat gradient bank) or [D] (one flat buffer).
        offsets: int64 [P + 1] (tensor or ints), 0 = offsets[0] <= ... <= offsets[P] = D; segment p is
            x[..., offsets[p]:offsets[p + 1]]. An empty segment gives 0.
    Returns:
        [R, P] (or [P] for 1-D x), float32 (float64 for float64 x): sum of x^2 over each segment.
    """
    check.tensor("x", x, dims=(1, 2))
    flat = x.dim() == 1
    x2 = x.reshape(1, -1) if flat else x
    off = check.offsets(offsets, x2.shape[1])
    if check_finite:
        check.finite_per_modality("x", x2)
    out = _run("segment_sq_norms", backend, x.device, x2.contiguous(), off)
    return out[0] if flat else out


# Op 1b --------------------------------------------------------------------------------------------------------
def tensor_sq_norms(tensors, *, check_finite: bool = False, backend: str = "auto") -> torch.Tensor:
    """Squared L2 norm of every tensor of a list, read where the tensors are, in one launch (Op 1b).

    The list form of segment_sq_norms, as torch._foreach_norm and apex's multi_tensor_apply take lists: the
    gradients or parameters of a model need no gather into one flat buffer first.

    Args:
        tensors: a non-empty list or tuple of tensors of any shapes (0-d and empty ones too), all of one float
            dtype and one device (call once per dtype for a mixed list). Dense tensors are read in place in any
            dimension order (contiguous, transposed, channels_last: a sum of squares ignores the order); a tensor
            with gaps (a slice, an expanded view) is first copied to contiguous memory inside the op.
    Returns:
        [P] with P = len(tensors), float32 (float64 for float64 tensors): out[p] = sum of tensors[p]^2.
    """
    tensors = check.tensor_list("tensors", tensors)
    if check_finite:
        for i, t in enumerate(tensors):
            if not bool(torch.isfinite(t).all()):
                raise ValueError(f"tensors[{i}] has NaN or Inf values; check_finite=True rejects non-finite gradients")
    return _run("tensor_sq_norms", backend, tensors[0].device, tensors)


# Op 2 ---------------------------------------------------------------------------------------------------------
def moments(G: torch.Tensor, *, check_finite: bool = False, backend: str = "auto"):
    """Per-modality gradient moments of K samples: S1 = sum_k G[:, k], S2 = sum_k G[:, k]^2.

    Args:
        G: [M, K, D] samples (per-sample or per-micro-batch gradients), any float dtype.
    Returns:
        (S1, S2), each [M, D], float32 (float64 for float64 G): moment banks for calibrated_aggregate.
    """
    check.tensor("G", G, dims=3)
    if check_finite:
        check.finite_per_modality("G", G)
    return _run("moments", backend, G.device, G.contiguous())


def moments_accumulate_(S1: torch.Tensor, S2: torch.Tensor, g: torch.Tensor, *, backend: str = "auto") -> None:
    """Add one sample per modality to the banks in place: S1 += g, S2 += g^2 (for gradient hooks).

    Args:
        S1, S2: contiguous float32 or float64 banks of one shape (typically [M, D]), written in place.
        g: the sample, same shape, any float dtype (converted to the banks' dtype).
    """
    check.tensor("S1", S1, dims=range(1, 9), dtypes=(torch.float32, torch.float64))
    check.tensor("S2", S2, dims=range(1, 9), dtypes=(S1.dtype,))
    check.tensor("g", g, dims=range(1, 9))
    check.shape("S2", S2, S1.shape, "S1.shape")
    check.shape("g", g, S1.shape, "S1.shape")
    check.same_device("S1", S1, S2=S2, g=g)
    check.contiguous_output("S1", S1)
    check.contiguous_output("S2", S2)
    _run("moments_accumulate_", backend, S1.device, S1, S2, g.contiguous())


# Op 3 ---------------------------------------------------------------------------------------------------------
def linear_moments(
    x: torch.Tensor, gy: torch.Tensor, *, bias: bool = False, s1: torch.Tensor | None = None, backend: str = "auto"
):
    """Per-sample gradient moments of an nn.Linear weight, without per-sample gradients.

    With W_n = sum_t gy[n, t]^T x[n, t] the weight gradient of sample n: S1 = sum_n W_n and S2 = sum_n W_n^2.
    gy must be gradients of the per-sample losses: with a mean-reduced loss over N samples, multiply the
    output gradient by N first (or use reduction="sum").

    Args:
        x: the layer input, [N, I] or [N, T, I] (T: sequence positions sharing the weight).
        gy: the gradient of the layer output, [N, O] or [N, T, O].
        bias: also return the bias moments sum_n b_n and sum_n b_n^2 with b_n = sum_t gy[n, t].
        s1: optional [O, I] weight gradient of the SUM of the per-sample losses (for example the layer's
            `.grad` after an ordinary backward of a sum-reduced loss), any float dtype: it is returned as S1
            (itself when it has the accumulation dtype, else converted: only as precise as the caller's
            gradient) and only S2 is formed, one GEMM instead of two for T = 1 (the Triton kernel skips its S1
            product).
    Returns:
        (S1, S2) each [O, I] (plus (B1, B2) each [O] with bias=True), float32 (float64 when x and gy are).
        The T > 1 path keeps O(O * I) memory: it never stores the N per-sample gradients.
    """
    check.tensor("x", x, dims=(2, 3))
    check.tensor("gy", gy, dims=(x.dim(),))
    check.same_device("x", x, gy=gy)
    if gy.shape[:-1] != x.shape[:-1]:
        lead = "[N]" if x.dim() == 2 else "[N, T]"
        raise ValueError(f"gy must match x in its leading dims {lead}: x is {tuple(x.shape)}, gy is {tuple(gy.shape)}")
    if s1 is not None:
        check.tensor("s1", s1, dims=2)
        check.shape("s1", s1, (gy.shape[-1], x.shape[-1]), "[O, I] (the weight gradient)")
        check.same_device("x", x, s1=s1)
    result = _run("linear_moments", backend, x.device, x, gy, s1)
    if s1 is not None:  # the kernels leave S1 empty: it is the caller's weight gradient
        result = (s1.to(result[1].dtype), *result[1:])
    return tuple(result) if bias else tuple(result[:2])


# Op 4 ---------------------------------------------------------------------------------------------------------
def _aggregate_args(kappa, eps, evidence_max, dtype):
    kappa = check.positive("kappa", kappa)
    evidence_max = check.positive("evidence_max", evidence_max, allow_inf=True)
    eps = reference.default_eps(dtype) if eps is None else check.positive("eps", eps)
    check.opinion_param("kappa", kappa, dtype, subnormal_ok=False)
    check.opinion_param("eps", eps, dtype, subnormal_ok=True)
    return kappa, eps, evidence_max


def _aggregate_result(result, return_uncertainty, out=None):
    # with out= the kernels return an empty tensor in its place (csrc/ops.cpp): the result is `out` itself
    out = result[0] if out is None else out
    stats, uncertainty = result[1], (result[2] if len(result) > 2 else None)
    return (out, stats, uncertainty) if return_uncertainty else (out, stats)


def _aggregate_out(out, S1: torch.Tensor, **inputs: torch.Tensor) -> None:
    """Op 4's out=: a contiguous [D] tensor of S1's dtype on S1's device that shares no memory with the inputs
    (the kernel reads them while it writes out, in chunks)."""
    D = S1.shape[1]
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"out must be a torch.Tensor or None, got {type(out).__name__}")
    check.shape("out", out, (D,), "[D] (one value per element of S1's rows)")
    if out.dtype != S1.dtype:
        raise TypeError(
            f"out must have S1's dtype {str(S1.dtype).removeprefix('torch.')} (the result's dtype), got "
            f"{str(out.dtype).removeprefix('torch.')}"
        )
    check.same_device("S1", S1, out=out)
    check.contiguous_output("out", out)
    if out.requires_grad:
        raise ValueError("out must not require grad: Op 4 is not differentiable (pass a buffer or out.detach())")
    if torch.compiler.is_compiling():
        return  # no data pointers in a traced graph: the kernels' own guard (at::assert_no_overlap) refuses it there
    for name, t in {"S1": S1, **inputs}.items():
        if _overlap(out, t):
            raise ValueError(f"out shares memory with {name}: pass a separate buffer (the kernel reads {name})")


def _overlap(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether the bytes two tensors span in one storage intersect (a conservative test for strided views)."""
    if a.numel() == 0 or b.numel() == 0 or a.device != b.device:
        return False
    if a.untyped_storage().data_ptr() != b.untyped_storage().data_ptr():
        return False

    def span(t):
        start = t.data_ptr()
        return start, start + (sum((n - 1) * abs(s) for n, s in zip(t.shape, t.stride())) + 1) * t.element_size()

    (a0, a1), (b0, b1) = span(a), span(b)
    return a0 < b1 and b0 < a1


def _counts(n, M: int, device, dtype) -> torch.Tensor:
    """check.counts, or inside a torch.compile graph (which cannot branch on values) the same checks with the
    value check as an in-graph assert that raises when the graph runs."""
    if not (torch.compiler.is_compiling() and isinstance(n, torch.Tensor)):
        return check.counts(n, M, device, dtype)
    if n.dim() != 1 or n.numel() != M:
        raise ValueError(f"n must have shape [M] = ({M},) (one count per modality of S1), got {tuple(n.shape)}")
    counts = n.to(device=device, dtype=dtype)
    torch._assert_async(
        ((counts >= 2) & torch.isfinite(counts)).all(),
        "every modality needs a finite count n >= 2 (a sample variance needs two samples)",
    )
    return counts


def calibrated_aggregate(
    S1: torch.Tensor,
    S2: torch.Tensor,
    n,
    kappa: float = 1.0,
    eps: float | None = None,
    evidence_max: float = 1e6,
    return_uncertainty: bool = False,
    *,
    out: torch.Tensor | None = None,
    check_finite: bool = False,
    backend: str = "auto",
):
    """Uncertainty-calibrated aggregation of M modalities' gradients (Op 4), one pass over S1 and S2.

    Per element d: mean mu_m = S1_m / n_m, sample variance v_m, evidence e_m = clamp(n_m mu_m^2 / (v_m + eps)
    - 1, 0, evidence_max), belief b_m = e_m / (e_m + kappa), and out = sum_m b_m mu_m (positive-part
    James-Stein shrinkage of every modality's mean gradient; b_m in [0, 1), so nothing is amplified).

    Args:
        S1, S2: [M, D] sums and sums of squares of the samples (1 <= M <= 16, D >= 1), one float dtype.
        n: [M] sample counts (tensor or numbers), each >= 2.
        kappa: prior weight of the subjective-logic opinions, > 0.
        eps: variance floor, > 0; default 1e-30 for float64, 1e-20 otherwise.
        evidence_max: cap on the evidence, > 0 (inf allowed).
        return_uncertainty: also return the fused uncertainty u[D] = prod_m kappa / (e_m + kappa).
        out: optional contiguous [D] tensor of S1's dtype on S1's device, sharing no memory with S1, S2 or n: the
            result is written into it (every element; what it held is never read) and it is returned as `out`,
            so a caller that reuses one buffer every step first-touches no fresh output pages (the Balancer's
            calibrated method does). The uncertainty, a diagnostic, is always a new tensor.
    Returns:
        out [D] in S1's dtype; stats [M, 4] float32 (float64 for float64) holding per modality
        (sum_d mu^2, sum_d (b mu)^2, mean_d b, fraction of d with e = 0); and with return_uncertainty u [D].
    """
    check.tensor("S1", S1, dims=2)
    check.tensor("S2", S2, dims=2, dtypes=(S1.dtype,))
    check.shape("S2", S2, S1.shape, "S1.shape [M, D]")
    check.same_device("S1", S1, S2=S2)
    M, D = S1.shape
    check.modalities("S1", M)
    if D < 1:
        raise ValueError("S1 must have D >= 1 elements per modality, got D = 0")
    counts = _counts(n, M, S1.device, _acc(S1.dtype))
    kappa, eps, evidence_max = _aggregate_args(kappa, eps, evidence_max, S1.dtype)
    if out is not None:
        _aggregate_out(out, S1, S2=S2, **({"n": n} if isinstance(n, torch.Tensor) else {}))
    if check_finite:
        check.finite_per_modality("S1", S1)
        check.finite_per_modality("S2", S2)
    result = _run(
        "calibrated_aggregate",
        backend,
        S1.device,
        S1.contiguous(),
        S2.contiguous(),
        counts,
        kappa,
        eps,
        evidence_max,
        return_uncertainty,
        out,
    )
    return _aggregate_result(result, return_uncertainty, out)


def calibrated_aggregate_samples(
    G: torch.Tensor,
    kappa: float = 1.0,
    eps: float | None = None,
    evidence_max: float = 1e6,
    return_uncertainty: bool = False,
    *,
    check_finite: bool = False,
    backend: str = "auto",
):
    """Op 4 straight from the samples G[M, K, D] (2 <= K <= 64): G is read once and S1/S2 never exist.

    Same math and returns as calibrated_aggregate with n_m = K, but the variance is the two-pass
    sum_k (g - mu)^2 / (K - 1), which is exact where S2 - n mu^2 would cancel.
    """
    check.tensor("G", G, dims=3)
    M, K, D = G.shape
    check.modalities("G", M)
    if not 2 <= K <= check.MAX_SAMPLES:
        raise ValueError(
            f"G must hold 2 <= K <= {check.MAX_SAMPLES} samples along dim 1, got K = {K}; for more "
            "samples accumulate moments (moments / moments_accumulate_) and call calibrated_aggregate"
        )
    if D < 1:
        raise ValueError("G must have D >= 1 elements per sample, got D = 0")
    kappa, eps, evidence_max = _aggregate_args(kappa, eps, evidence_max, G.dtype)
    if check_finite:
        check.finite_per_modality("G", G)
    result = _run(
        "calibrated_aggregate_samples", backend, G.device, G.contiguous(), kappa, eps, evidence_max, return_uncertainty
    )
    return _aggregate_result(result, return_uncertainty)


# Op 5 ---------------------------------------------------------------------------------------------------------
MAX_GRAM_ROWS = 64


def gram(X: torch.Tensor, *, check_finite: bool = False, backend: str = "auto") -> torch.Tensor:
    """Gram matrix out[i, j] = sum_d X[i, d] X[j, d] of R <= 64 gradient rows, in one pass over X.

    Accumulated in float32 (float64), returned symmetric in X's dtype (so a float16 result overflows to inf
    above 65504: pass float32 rows if their squared norms can be that large). For MGDA / MMPareto min-norm
    weights and cosine similarities between modality gradients.
    """
    check.tensor("X", X, dims=2)
    if not 1 <= X.shape[0] <= MAX_GRAM_ROWS:
        raise ValueError(f"X must have 1 <= R <= {MAX_GRAM_ROWS} rows, got R = {X.shape[0]}")
    if check_finite:
        check.finite_per_modality("X", X)
    return _run("gram", backend, X.device, X.contiguous())


# Op 6 ---------------------------------------------------------------------------------------------------------
def weighted_sum(
    X: torch.Tensor, w: torch.Tensor, *, check_finite: bool = False, backend: str = "auto"
) -> torch.Tensor:
    """out[D] = sum_r w_r X_r, in X's dtype.

    Args:
        X: [R, D] rows (for example per-modality gradients).
        w: [R] one weight per row (any float dtype, applied in the accumulation dtype), or [R, D] one weight
            per element (X's dtype).
    """
    check.tensor("X", X, dims=2)
    check.tensor("w", w, dims=(1, 2))
    check.same_device("X", X, w=w)
    R, D = X.shape
    if w.dim() == 1:
        check.shape("w", w, (R,), "[R]")
        w = w.to(_acc(X.dtype))
    else:
        check.shape("w", w, (R, D), "[R, D]")
        if w.dtype != X.dtype:
            raise TypeError(
                f"w of shape [R, D] must have X's dtype {str(X.dtype).removeprefix('torch.')}, got "
                f"{str(w.dtype).removeprefix('torch.')} (convert it once yourself; a hidden "
                "conversion would cost a pass over R * D values)"
            )
    if check_finite:
        check.finite_per_modality("X", X)
        check.finite_per_modality("w", w.reshape(R, -1))
    return _run("weighted_sum", backend, X.device, X.contiguous(), w.contiguous())


def segment_scale_(
    x: torch.Tensor,
    offsets,
    scale,
    *,
    noise_std=None,
    generator: torch.Generator | None = None,
    seed: int | None = None,
    offset: int = 0,
    backend: str = "auto",
) -> torch.Tensor:
    """Scale every segment of x in place: x[seg p] *= scale[p]; with noise_std also add N(0, noise_std[p]^2).

    Args:
        x: contiguous [D] buffer (for example a flat gradient bank of one encoder), written in place.
        offsets: int64 [P + 1] segment boundaries (see segment_sq_norms).
        scale: [P] per-segment factors (tensor or numbers).
        noise_std: optional [P] standard deviations (>= 0). The noise is drawn inside the kernel from a
            counter-based stream (docs/math.md, Op 6): element d gets the standard normal number offset + d of the
            stream `seed`, in the accumulation dtype, the same bits on every backend and device.
        seed, offset: ints in [0, 2^64): the stream and the counter of x[0]. A shard of a larger buffer that starts
            at element `start` passes offset + start and draws exactly its own part of the whole buffer's noise.
        generator: when `seed` is None, (seed, offset) come from it (default generator if None), advancing it so
            the next call draws new noise and a seeded generator reproduces the sequence (see _stream_from).
    Returns:
        x.
    """
    check.tensor("x", x, dims=1)
    check.contiguous_output("x", x)
    off = check.offsets(offsets, x.shape[0])
    P = off.numel() - 1
    acc = _acc(x.dtype)
    scale = _per_segment("scale", scale, P, x.device, acc)
    if seed is not None and generator is not None:
        raise ValueError("pass either seed= (with offset=) or generator=, not both")
    for name, value in (("seed", seed), ("offset", offset)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**64):
            raise ValueError(f"{name} must be an int in [0, 2**64), got {value!r}")
    if noise_std is not None:
        noise_std = _per_segment("noise_std", noise_std, P, x.device, acc)
        if bool((noise_std < 0).any()):
            raise ValueError("noise_std must be >= 0 for every segment")
        if generator is not None and generator.device != x.device:
            raise ValueError(f"generator is on {generator.device} but x is on {x.device}")
        if seed is None:
            seed, offset = _stream_from(generator, x.device, x.shape[0], offset)
    seed = seed or 0
    # the schema's int is signed 64-bit: pass the unsigned values' bits
    _run("segment_scale_", backend, x.device, x, off, scale, noise_std, _as_int64(seed), _as_int64(offset))
    return x


# XORed into a CUDA generator's seed so that this stream's keys differ from those of torch's own Philox draws.
_STREAM_TAG = int.from_bytes(b"modfuse", "little")


def _stream_from(generator: torch.Generator | None, device: torch.device, D: int, offset: int) -> tuple[int, int]:
    """(seed, offset) for one segment_scale_ call from a torch.Generator, without a GPU->host sync.

    A CPU generator (Mersenne Twister, no counter) gives one 63-bit seed per call: a tiny draw that advances it
    reproducibly. A CUDA generator is itself Philox with a host-side (seed, offset): its seed (tagged) keys our
    stream, its offset is the counter of x[0], and it is advanced past the D counters used, as a torch random op
    of D values would advance it; both are host integers, so nothing waits for the GPU."""
    if device.type == "cuda":
        g = generator if generator is not None else torch.cuda.default_generators[device.index or 0]
        start = g.get_offset()
        g.set_offset(start + (D + 3) // 4 * 4)
        return g.initial_seed() ^ _STREAM_TAG, (start + offset) % 2**64
    g = generator if generator is not None else torch.default_generator
    seed = int(torch.randint(0, 2**63 - 1, (), generator=g, device=g.device, dtype=torch.int64))
    return seed, offset


def _as_int64(value: int) -> int:
    return value - 2**64 if value >= 2**63 else value


# Op 7 ---------------------------------------------------------------------------------------------------------
def segment_moments(x: torch.Tensor, offsets, *, check_finite: bool = False, backend: str = "auto") -> torch.Tensor:
    """Sum and sum of squares of every segment of every row, accumulated in float64, in one pass.

    Args:
        x: [R, D] or [D] (any of the four dtypes; non-contiguous input is copied first).
        offsets: int64 [P + 1] segment boundaries (see segment_sq_norms); an empty segment gives (0, 0).
    Returns:
        float64 [R, P, 2] (or [P, 2] for 1-D x): out[..., p, 0] = sum of x over segment p, out[..., p, 1] = sum
        of x^2. With n = the segment's length, var = (out[1] - out[0]^2 / n) / (n - 1) is its unbiased variance
        (OGM-GE's per-tensor std) without a float64 copy of x.
    """
    check.tensor("x", x, dims=(1, 2))
    flat = x.dim() == 1
    x2 = x.reshape(1, -1) if flat else x
    off = check.offsets(offsets, x2.shape[1])
    if check_finite:
        check.finite_per_modality("x", x2)
    out = _run("segment_moments", backend, x.device, x2.contiguous(), off)
    return out[0] if flat else out


def _per_segment(name: str, values, P: int, device, dtype) -> torch.Tensor:
    t = values if isinstance(values, torch.Tensor) else torch.as_tensor(values, dtype=dtype)
    check.tensor(name, t, dims=1, dtypes=check.FLOAT_DTYPES + (torch.int64, torch.int32))
    check.shape(name, t, (P,), "[P] (one per segment)")
    t = t.to(device=device, dtype=dtype).contiguous()
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} must be finite for every segment")
    return t


# Fake (meta) kernels: shapes and dtypes only, so torch.compile / export trace the ops without running them.
if _C is not None:

    @torch.library.register_fake("modfuse::segment_sq_norms")
    def _segment_sq_norms_fake(x, offsets):
        return x.new_empty(x.shape[0], offsets.shape[0] - 1, dtype=_acc(x.dtype))

    @torch.library.register_fake("modfuse::tensor_sq_norms")
    def _tensor_sq_norms_fake(tensors):
        return tensors[0].new_empty(len(tensors), dtype=_acc(tensors[0].dtype))

    @torch.library.register_fake("modfuse::moments")
    def _moments_fake(G):
        M, _, D = G.shape
        return G.new_empty(M, D, dtype=_acc(G.dtype)), G.new_empty(M, D, dtype=_acc(G.dtype))

    @torch.library.register_fake("modfuse::moments_accumulate_")
    def _moments_accumulate_fake(S1, S2, g):
        return None

    @torch.library.register_fake("modfuse::linear_moments")
    def _linear_moments_fake(x, gy, s1=None):
        acc = torch.float64 if x.dtype == gy.dtype == torch.float64 else torch.float32
        O, I = gy.shape[-1], x.shape[-1]
        return (
            x.new_empty((O, I) if s1 is None else (0,), dtype=acc),
            x.new_empty(O, I, dtype=acc),
            x.new_empty(O, dtype=acc),
            x.new_empty(O, dtype=acc),
        )

    def _aggregate_fake(like, M, D, return_uncertainty, into_out=False):
        return (
            like.new_empty(0 if into_out else D),  # with out= the result is written there (csrc/ops.cpp)
            like.new_empty(M, 4, dtype=_acc(like.dtype)),
            like.new_empty(D if return_uncertainty else 0),
        )

    @torch.library.register_fake("modfuse::calibrated_aggregate")
    def _calibrated_aggregate_fake(
        S1, S2, n, kappa=1.0, eps=None, evidence_max=1e6, return_uncertainty=False, out=None
    ):
        return _aggregate_fake(S1, S1.shape[0], S1.shape[1], return_uncertainty, out is not None)

    @torch.library.register_fake("modfuse::calibrated_aggregate_samples")
    def _calibrated_aggregate_samples_fake(G, kappa=1.0, eps=None, evidence_max=1e6, return_uncertainty=False):
        return _aggregate_fake(G, G.shape[0], G.shape[2], return_uncertainty)

    @torch.library.register_fake("modfuse::gram")
    def _gram_fake(X):
        return X.new_empty(X.shape[0], X.shape[0])

    @torch.library.register_fake("modfuse::weighted_sum")
    def _weighted_sum_fake(X, w):
        return X.new_empty(X.shape[1])

    @torch.library.register_fake("modfuse::segment_scale_")
    def _segment_scale_fake(x, offsets, scale, noise_std=None, seed=0, offset=0):
        return None

    @torch.library.register_fake("modfuse::segment_moments")
    def _segment_moments_fake(x, offsets):
        return x.new_empty(x.shape[0], offsets.shape[0] - 1, 2, dtype=torch.float64)
