"""Shared fixtures: NaN-poisoned allocations, dtype tolerances, random inputs."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, settings

# Property-based suite (tests/test_properties.py): "ci" (the default) is a fixed, derandomized budget that keeps
# the suite under a minute on 2 cores; `pytest --hypothesis-profile=long` explores far more (and new) examples.
# The poisoning fixture below is function-scoped but idempotent, so reusing it across examples is fine.
_common = {"deadline": None, "suppress_health_check": [HealthCheck.function_scoped_fixture, HealthCheck.too_slow]}
settings.register_profile("ci", max_examples=20, derandomize=True, print_blob=True, **_common)
settings.register_profile("long", max_examples=1000, print_blob=True, **_common)
settings.load_profile("ci")

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
DTYPE_IDS = ["fp32", "fp16", "bf16", "fp64"]

# Relative tolerance for a result rounded to (or computed from values in) each dtype, against the float64
# reference evaluated on the very same input values. float32 results carry float32 accumulation error.
RTOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


@pytest.fixture(autouse=True)
def poison_uninitialized_memory():
    """Every torch.empty / at::empty (which the kernels allocate outputs with) is filled with NaN, so an
    output element a kernel forgets to write shows up as NaN instead of as stale memory that happens to match."""
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    yield
    torch.use_deterministic_algorithms(previous)


@pytest.fixture
def gen():
    """A fresh, seeded generator per test: inputs are random but reproducible."""
    return torch.Generator().manual_seed(20261123)


def assert_close(actual, expected, dtype, *, scale=None, rtol=None):
    """Compare with the tolerance of `dtype`; `scale` sets the absolute floor (for sums with cancellation)."""
    rtol = RTOL[dtype] if rtol is None else rtol
    expected = expected.to(torch.float64)
    if scale is None:
        scale = expected.abs().max().item() if expected.numel() else 1.0
    atol = rtol * max(float(scale), 1e-30)
    torch.testing.assert_close(actual.to("cpu", torch.float64), expected, rtol=rtol, atol=atol, equal_nan=False)


def noncontiguous(t: torch.Tensor) -> torch.Tensor:
    """The same values as t in a strided (transposed-storage) layout."""
    nc = t.detach().clone().flip(-1).transpose(0, -1).contiguous().transpose(0, -1).flip(-1)
    assert not nc.is_contiguous() or t.numel() <= 1 or min(t.shape) == 1
    assert torch.equal(nc, t)
    return nc


def gradient_samples(M, K, D, dtype, gen, *, signal=0.7):
    """K gradient samples per modality: a per-element mean (signal) plus unit noise, with modality scales that
    differ by 10x, so evidence spans zero (noise) to large (consistent sign)."""
    mean = torch.randn(M, 1, D, generator=gen, dtype=torch.float64) * signal
    scale = torch.logspace(-1, 1, M, dtype=torch.float64).reshape(M, 1, 1)
    G = (mean + torch.randn(M, K, D, generator=gen, dtype=torch.float64)) * scale
    return G.to(dtype)


# -- backends: the same test matrix on the CPU kernels, the CUDA kernels and the Triton kernels ------------------
# Triton's interpreter runs the Triton kernels on CPU tensors (tests/test_triton.py, small shapes); it must be
# switched on before triton is first imported, so here, when there is no GPU to run them on.
if not torch.cuda.is_available():
    import os

    os.environ.setdefault("TRITON_INTERPRET", "1")


class Target:
    """Where a matrix test runs: a backend and the device of its tensors."""

    def __init__(self, backend: str, device: str):
        self.backend, self.device = backend, torch.device(device)

    def __call__(self, t):
        """Move an input to this target's device (None and numbers pass through)."""
        return t.to(self.device) if isinstance(t, torch.Tensor) else t

    def skip_unless(self, op: str) -> None:
        from modfuse.ops import TRITON_OPS

        if self.backend == "triton" and op not in TRITON_OPS:
            pytest.skip(f"no Triton kernel for {op}")


def _cuda_backend_ready() -> bool:
    import modfuse.ops

    return torch.cuda.is_available() and modfuse.ops._cuda_built()


def _gpu_triton_ready() -> bool:
    import importlib.util

    return torch.cuda.is_available() and importlib.util.find_spec("triton") is not None


TARGETS = [
    pytest.param(("cpu", "cpu"), id="cpu"),
    pytest.param(
        ("cuda", "cuda"),
        id="cuda",
        marks=pytest.mark.skipif(not _cuda_backend_ready(), reason="needs a GPU and a CUDA build of modfuse._C"),
    ),
    pytest.param(
        ("triton", "cuda"),
        id="triton",
        marks=pytest.mark.skipif(not _gpu_triton_ready(), reason="needs a GPU and triton"),
    ),
]


@pytest.fixture(params=TARGETS)
def target(request) -> Target:
    return Target(*request.param)
