"""docs/math.md (the ops) in plain PyTorch: the oracle every kernel is tested against.

Each function follows its docs/math.md section line by line and favours clarity over speed. Arithmetic runs in the
accumulation dtype of the contract: float64 for float64 inputs, float32 for float32/float16/bfloat16. Call it on
float64 copies of the inputs to get the exact answer a kernel is compared with. No argument checks here: the
public entry points in modfuse.ops validate before they dispatch to any backend, this one included.
"""

from __future__ import annotations

import torch

__all__ = [
    "accumulation_dtype",
    "default_eps",
    "segment_sq_norms",
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
def linear_moments(x: torch.Tensor, gy: torch.Tensor):
    """Per-sample gradient moments of an nn.Linear weight and bias, built the obvious way.

    W_n = sum_t gy[n, t]^T x[n, t]; returns (sum_n W_n, sum_n W_n^2, sum_n b_n, sum_n b_n^2) with
    b_n = sum_t gy[n, t]. This oracle materialises every W_n (O(N*O*I) memory): fine for tests, never for use.
    W_n^2 overflows only where the per-sample gradient itself exceeds sqrt(max) of the accumulation dtype
    (~1.8e19 for float32); the kernels' T = 1 form (gy^2)^T (x^2) is balanced per sample to match that range.
    """
    acc = torch.float64 if x.dtype == gy.dtype == torch.float64 else torch.float32
    if x.dim() == 2:
        x, gy = x[:, None, :], gy[:, None, :]
    x, gy = x.to(acc), gy.to(acc)
    W = torch.einsum("nto,nti->noi", gy, x)
    b = gy.sum(1)
    return W.sum(0), W.square().sum(0), b.sum(0), b.square().sum(0)


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


def segment_scale_(x, offsets, scale, noise_std=None, generator=None, noise=None):
    """x[d] <- x[d] * scale[p] (+ noise[d] * noise_std[p]) for d in segment p, in place; returns x.

    The noise is one standard-normal draw of shape [D] in the accumulation dtype from `generator`
    (`torch.randn(D, generator=generator)`), so every backend that draws it the same way agrees exactly.
    Pass `noise` to reuse a draw.
    """
    acc = accumulation_dtype(x.dtype)
    seg = _segment_ids(offsets, x.numel(), x.device)
    y = x.to(acc) * scale.to(acc)[seg]
    if noise_std is not None:
        if noise is None:
            noise = torch.randn(x.numel(), generator=generator, dtype=acc, device=x.device)
        y = y + noise.to(acc) * noise_std.to(acc)[seg]
    return x.copy_(y)
