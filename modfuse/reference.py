"""docs/math.md (the ops) in plain PyTorch: the oracle every kernel is tested against.

Each function follows its docs/math.md section line by line and favours clarity over speed. Arithmetic runs in the
accumulation dtype of the contract: float64 for float64 inputs, float32 for float32/float16/bfloat16. Call it on
float64 copies of the inputs to get the exact answer a kernel is compared with. No argument checks here: the
public entry points in modfuse.ops validate before they dispatch to any backend, this one included.
"""

from __future__ import annotations

import math

import torch

__all__ = [
    "accumulation_dtype",
    "default_eps",
    "segment_sq_norms",
    "tensor_sq_norms",
    "moments",
    "moments_accumulate_",
    "linear_moments",
    "calibration_opinions",
    "calibrated_aggregate",
    "calibrated_aggregate_samples",
    "calibrated_aggregate_precision",
    "gram",
    "weighted_sum",
    "segment_scale_",
    "segment_moments",
    "philox4x32_10",
    "normal_noise",
]


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; float32, float16 and bfloat16 accumulate in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def default_eps(dtype: torch.dtype) -> float:
    """Op 4's variance floor: 1e-30 for float64, 1e-20 for everything that accumulates in float32."""
    return 1e-30 if dtype == torch.float64 else 1e-20


def _segment_ids(offsets: torch.Tensor, D: int, device) -> torch.Tensor:
    """Segment index of every element d in [0, D)."""
    return torch.bucketize(torch.arange(D, device=device), offsets[1:].to(device), right=True)


# Op 1 ---------------------------------------------------------------------------------------------------------
def segment_sq_norms(x: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """out[r, p] = sum_{d in segment p} x[r, d]^2, in the accumulation dtype; an empty segment gives 0."""
    acc = accumulation_dtype(x.dtype)
    R, D = x.shape
    P = offsets.numel() - 1
    sq = x.to(acc).square()
    out = torch.zeros(R, P, dtype=acc, device=x.device)
    return out.index_add_(1, _segment_ids(offsets, D, x.device), sq)


def tensor_sq_norms(tensors: list[torch.Tensor]) -> torch.Tensor:
    """out[p] = sum of tensors[p]^2 over all its elements, in the accumulation dtype; an empty tensor gives 0."""
    acc = accumulation_dtype(tensors[0].dtype)
    return torch.stack([t.to(acc).square().sum() for t in tensors])


# Op 2 ---------------------------------------------------------------------------------------------------------
def moments(G: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """S1 = sum_k G[:, k, :], S2 = sum_k G[:, k, :]^2, as float32 (float64) banks."""
    g = G.to(accumulation_dtype(G.dtype))
    return g.sum(1), g.square().sum(1)


def moments_accumulate_(S1: torch.Tensor, S2: torch.Tensor, g: torch.Tensor) -> None:
    """Add one sample per modality in place: S1 += g, S2 += g^2 (g converted to the banks' dtype first)."""
    g = g.to(S1.dtype)
    S1.add_(g)
    S2.add_(g.square())


# Op 3 ---------------------------------------------------------------------------------------------------------
def linear_moments(x: torch.Tensor, gy: torch.Tensor, s1: torch.Tensor | None = None):
    """Per-sample gradient moments of an nn.Linear weight and bias, built the obvious way.

    W_n = sum_t gy[n, t]^T x[n, t]; returns (sum_n W_n, sum_n W_n^2, sum_n b_n, sum_n b_n^2) with
    b_n = sum_t gy[n, t]; with s1 (the caller's weight gradient of the summed loss) the first is empty, as from
    the kernels (modfuse.ops returns s1 in its place). This oracle materialises every W_n (O(N*O*I) memory): fine for tests, never for use.
    W_n^2 overflows only where the per-sample gradient itself exceeds sqrt(max) of the accumulation dtype
    (~1.8e19 for float32); the kernels' T = 1 form (gy^2)^T (x^2) is balanced per sample to match that range.
    """
    acc = torch.float64 if x.dtype == gy.dtype == torch.float64 else torch.float32
    if x.dim() == 2:
        x, gy = x[:, None, :], gy[:, None, :]
    x, gy = x.to(acc), gy.to(acc)
    W = torch.einsum("nto,nti->noi", gy, x)
    b = gy.sum(1)
    S1 = W.sum(0) if s1 is None else x.new_empty(0)  # s1 given: the caller has S1 (as from the kernels)
    return S1, W.square().sum(0), b.sum(0), b.square().sum(0)


# Op 4 ---------------------------------------------------------------------------------------------------------
def calibration_opinions(mu, v, n, kappa=1.0, eps=None, evidence_max=1e6):
    """Steps 2-3 of Op 4 from the means mu[M, D], sample variances v[M, D] and counts n[M].

    Returns (e, b, u): evidence, belief and uncertainty of every modality and dimension. NaN propagates
    (torch.clamp keeps NaN), so a non-finite input poisons exactly the dimensions it touches.

    Ranges (issue 14 item 4; modfuse.ops checks them): in float32 arithmetic eps must be >= 1.4e-45 (else it is 0
    and a zero column gives 0 / 0) and kappa >= 1.18e-38 (`kappa / t` is computed as kappa * (1 / t), so 1 / kappa
    must be finite); float64 takes any positive finite value. Where n mu^2 overflows, t2 = inf and e is capped.
    """
    if eps is None:
        eps = default_eps(mu.dtype)
    n = n.to(mu.dtype).reshape(-1, 1)
    t2 = n * mu.square() / (v + eps)  # squared t-statistic of the mean: ~1 on pure noise
    e = torch.clamp(t2 - 1, min=0).clamp(max=evidence_max)
    b = e / (e + kappa)
    u = kappa / (e + kappa)
    return e, b, u


def _aggregate(mu, v, n, kappa, eps, evidence_max, return_uncertainty, out_dtype):
    """Steps 2-5 of Op 4 from means and variances; shared by both forms."""
    e, b, u = calibration_opinions(mu, v, n, kappa, eps, evidence_max)
    out = (b * mu).sum(0)  # subset masses collapse to coefficient b_m per modality (docs/math.md, Op 4 step 5)
    stats = torch.stack([mu.square().sum(1), (b * mu).square().sum(1), b.mean(1), (e == 0).to(mu.dtype).mean(1)], dim=1)
    result = (out.to(out_dtype), stats)
    if return_uncertainty:
        result += (u.prod(0).to(out_dtype),)  # fused uncertainty: the mass of "no modality believed"
    return result


def calibrated_aggregate(S1, S2, n, kappa=1.0, eps=None, evidence_max=1e6, return_uncertainty=False):
    """Op 4 from the moment banks S1[M, D], S2[M, D] and counts n[M] (n_m >= 2)."""
    out_dtype = S1.dtype
    acc = accumulation_dtype(out_dtype)
    S1, S2 = S1.to(acc), S2.to(acc)
    n = torch.as_tensor(n, device=S1.device).to(acc).reshape(-1, 1)
    mu = S1 / n
    v = torch.clamp(S2 - n * mu.square(), min=0) / (n - 1)
    return _aggregate(mu, v, n, kappa, eps, evidence_max, return_uncertainty, out_dtype)


def calibrated_aggregate_samples(G, kappa=1.0, eps=None, evidence_max=1e6, return_uncertainty=False):
    """Op 4 straight from the samples G[M, K, D], with the two-pass sample variance."""
    acc = accumulation_dtype(G.dtype)
    g = G.to(acc)
    K = g.shape[1]
    mu = g.mean(1)
    v = (g - mu[:, None, :]).square().sum(1) / (K - 1)
    n = torch.full((g.shape[0],), K, dtype=acc, device=g.device)
    return _aggregate(mu, v, n, kappa, eps, evidence_max, return_uncertainty, G.dtype)


def calibrated_aggregate_precision(S1, S2, n, kappa=1.0, eps=None, evidence_max=1e6, return_uncertainty=False):
    """The evidence-from-precision form of Op 4 (docs/math.md, calibrated, evidence="precision"); plain PyTorch only.

    One scalar evidence per row: the precision of its mean gradient, P_r = 1 / (mean_d v_r / n_r + eps), relative to
    the rows' mean precision, e_r = min(R P_r / sum_j P_j, evidence_max); b_r = e_r / (e_r + kappa) and
    out = sum_r b_r mu_r. Same returns as calibrated_aggregate (stats columns 2 and 3 are then constant over d).
    """
    out_dtype = S1.dtype
    acc = accumulation_dtype(out_dtype)
    if eps is None:
        eps = default_eps(out_dtype)
    S1, S2 = S1.to(acc), S2.to(acc)
    n = torch.as_tensor(n, device=S1.device).to(acc).reshape(-1, 1)
    mu = S1 / n
    v = torch.clamp(S2 - n * mu.square(), min=0) / (n - 1)
    precision = 1 / ((v / n).mean(1, keepdim=True) + eps)  # [R, 1]: inverse mean variance of the mean gradient
    e = torch.clamp(precision.shape[0] * precision / precision.sum(), max=evidence_max).expand_as(mu)
    b = e / (e + kappa)
    u = kappa / (e + kappa)
    out = (b * mu).sum(0)
    stats = torch.stack([mu.square().sum(1), (b * mu).square().sum(1), b.mean(1), (e == 0).to(acc).mean(1)], dim=1)
    result = (out.to(out_dtype), stats)
    if return_uncertainty:
        result += (u.prod(0).to(out_dtype),)
    return result


# Op 5 ---------------------------------------------------------------------------------------------------------
def gram(X: torch.Tensor) -> torch.Tensor:
    """out[i, j] = sum_d X[i, d] X[j, d], accumulated in the accumulation dtype, returned in X's dtype."""
    x = X.to(accumulation_dtype(X.dtype))
    return (x @ x.T).to(X.dtype)


# Op 6 ---------------------------------------------------------------------------------------------------------
def weighted_sum(X: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """out = sum_r w_r X_r with w[R] (one weight per row) or w[R, D] (per element), returned in X's dtype."""
    acc = accumulation_dtype(X.dtype)
    w = w.to(acc)
    if w.dim() == 1:
        w = w[:, None]
    return (w * X.to(acc)).sum(0).to(X.dtype)


def segment_scale_(x, offsets, scale, noise_std=None, seed=0, offset=0):
    """x[d] <- x[d] * scale[p] (+ z_d * noise_std[p]) for d in segment p, in place; returns x.

    z_d = normal_noise(D, seed, offset)[d]: the counter-based stream of docs/math.md (Op 6), the kernels' bits.
    """
    acc = accumulation_dtype(x.dtype)
    seg = _segment_ids(offsets, x.numel(), x.device)
    y = x.to(acc) * scale.to(acc)[seg]
    if noise_std is not None:
        noise = normal_noise(x.numel(), seed, offset, acc).to(x.device)
        y = y + noise * noise_std.to(acc)[seg]
    return x.copy_(y)


# Op 6's noise stream (csrc/philox_normal.h, line by line) ---------------------------------------------------------
_PHILOX_M = (0xD2511F53, 0xCD9E8D57)
_PHILOX_W = (0x9E3779B9, 0xBB67AE85)
_U32 = 0xFFFFFFFF  # numpy is imported where the stream is drawn: `import modfuse` needs only torch


def philox4x32_10(counter, key):
    """Philox4x32-10 (Random123's philox4x32, R = 10) of counters [N, 4] under keys [N, 2] (uint32 words, any
    array-like), as uint32 [N, 4]. uint32 products are formed in uint64, where they cannot overflow."""
    import numpy as np

    U32 = np.uint64(_U32)
    c = [np.asarray(counter, dtype=np.uint64).reshape(-1, 4)[:, i].copy() for i in range(4)]
    k = np.asarray(key, dtype=np.uint64).reshape(-1, 2)
    k0, k1 = k[:, 0].copy(), k[:, 1].copy()
    m0, m1 = np.uint64(_PHILOX_M[0]), np.uint64(_PHILOX_M[1])
    for _ in range(10):
        p0, p1 = m0 * c[0], m1 * c[2]
        c = [(p1 >> np.uint64(32)) ^ c[1] ^ k0, p1 & U32, (p0 >> np.uint64(32)) ^ c[3] ^ k1, p0 & U32]
        k0 = (k0 + np.uint64(_PHILOX_W[0])) & U32
        k1 = (k1 + np.uint64(_PHILOX_W[1])) & U32
    return np.stack(c, 1).astype(np.uint32)


def _horner(w, coefs, dtype):
    p = torch.tensor(coefs[-1], dtype=dtype)
    for c in reversed(coefs[:-1]):
        p = p * w + torch.tensor(c, dtype=dtype)
    return p


def _series(kind: str, n: int) -> list[float]:
    """The double coefficients of csrc/philox_normal.h (log_coef, sin_coef, cos_coef), computed the same way."""
    out = []
    for k in range(n):
        if kind == "log":
            out.append(1.0 / (2 * k + 3))
            continue
        f = 1.0
        for i in range(2, 2 * k + (2 if kind == "sin" else 1)):
            f *= i
        out.append((-1.0 if k % 2 else 1.0) / f)
    return out


def normal_noise(D: int, seed: int, offset: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The standard normals z_d, d < D, of docs/math.md Op 6 in `dtype` (float32 or float64), on the CPU: with
    c = offset + d (mod 2^64), Philox4x32-10 with key = seed and counter = c // 4 gives four words, two Box-Muller
    pairs (words 0, 1 and 2, 3) with the kernels' own log, sin and cos series, and z_d is lane c % 4 of
    [r01 cos t01, r01 sin t01, r23 cos t23, r23 sin t23]; every operation separately rounded in `dtype` as in
    csrc/philox_normal.h."""
    import numpy as np

    U32 = np.uint64(_U32)
    first = offset % 2**64
    lead = first % 4  # lanes of the first group before element 0
    groups = (D + lead + 3) // 4
    # the group counters wrap mod 2^62 with the element counters (2^64 is a multiple of 4)
    g = (np.arange(groups, dtype=np.uint64) + np.uint64(first // 4)) & np.uint64(2**62 - 1)
    seed = seed % 2**64
    words = philox4x32_10(
        np.stack([g & U32, g >> np.uint64(32), np.zeros_like(g), np.zeros_like(g)], 1),
        np.broadcast_to(np.array([seed & 0xFFFFFFFF, seed >> 32], dtype=np.uint64), (groups, 2)),
    ).astype(np.int64)
    pair01 = _box_muller(torch.from_numpy(words[:, 0]), torch.from_numpy(words[:, 1]), dtype)
    pair23 = _box_muller(torch.from_numpy(words[:, 2]), torch.from_numpy(words[:, 3]), dtype)
    lanes = torch.stack([*pair01, *pair23], 1).reshape(-1)  # counter order: group-major, then the 4 lanes
    return lanes[lead : lead + D].clone()


def _box_muller(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(r cos t, r sin t) of the word pairs (a, b) (int64 holding uint32), csrc/philox_normal.h's box_muller."""
    import numpy as np

    wide = dtype == torch.float64
    bits = 32 if wide else 24  # double: a whole word per uniform; float: a word's top 24 bits
    k1 = a + 1 if wide else (a >> 8) + 1  # [1, 2^bits]
    k2 = b if wide else b >> 8  # [0, 2^bits)

    def const(v):
        return torch.tensor(v, dtype=dtype)

    # radius sqrt(-2 ln u1), u1 = k1 2^-bits = m 2^e
    u1 = k1.to(dtype) * const(1.0 / 2**bits)
    m, e = torch.frexp(u1)
    low = m < const(math.sqrt(0.5))
    m, e = torch.where(low, m * const(2.0), m), torch.where(low, e - 1, e)
    f = m - const(1.0)
    s = f / (const(2.0) + f)
    z = s * s
    log_terms = 9 if wide else 4
    ln_m = const(2.0) * s + const(2.0) * s * z * _horner(z, _series("log", log_terms), dtype)
    ln_u1 = e.to(dtype) * const(math.log(2.0)) + ln_m
    # numpy's sqrt: correctly rounded as IEEE and the kernels' sqrt are (torch's float32 CPU sqrt is not, by an ulp)
    radius = torch.from_numpy(np.sqrt((const(-2.0) * ln_u1).numpy()))
    # angle 2 pi u2 = q pi/2 + theta, |theta| <= pi/4
    quarter = 1 << (bits - 2)
    q = (k2 + quarter // 2) >> (bits - 2)
    theta = (k2 - (q << (bits - 2))).to(dtype) * const(math.pi / 2 ** (bits - 1))
    t2 = theta * theta
    sin_t = theta * _horner(t2, _series("sin", 9 if wide else 5), dtype)
    cos_t = _horner(t2, _series("cos", 10 if wide else 6), dtype)
    odd, high = (q & 1).bool(), (q & 2).bool()
    # cos(q pi/2 + theta) and sin(q pi/2 + theta)
    cos = torch.where(odd, torch.where(high, sin_t, -sin_t), torch.where(high, -cos_t, cos_t))
    sin = torch.where(odd, torch.where(high, -cos_t, cos_t), torch.where(high, -sin_t, sin_t))
    return radius * cos, radius * sin


# Op 7 ---------------------------------------------------------------------------------------------------------
def segment_moments(x: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """out[r, p] = (sum_{d in segment p} x[r, d], sum x[r, d]^2) in float64 for every input dtype: [R, P, 2]."""
    R, D = x.shape
    P = offsets.numel() - 1
    v = x.to(torch.float64)
    out = torch.zeros(R, P, 2, dtype=torch.float64, device=x.device)
    seg = _segment_ids(offsets, D, x.device)
    out[:, :, 0].index_add_(1, seg, v)
    out[:, :, 1].index_add_(1, seg, v.square())
    return out
