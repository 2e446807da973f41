"""pytest-benchmark microbenchmarks, one group per op (run: python -m pytest bench --benchmark-enable).

Not part of the test suite (testpaths = tests). Timings are CPU timings of this machine; for the side-by-side
table with ratios use `python -m bench`.
"""

import pytest
import torch

import modfuse
from bench import cases
from modfuse import reference

D, M = 4 << 20, 3


@pytest.fixture(scope="module")
def banks():
    return cases.moment_banks(M, D)


@pytest.mark.benchmark(group="calibrated_aggregate")
@pytest.mark.parametrize("impl", ["modfuse", "reference"])
def test_calibrated_aggregate(benchmark, banks, impl):
    fn = modfuse.calibrated_aggregate if impl == "modfuse" else reference.calibrated_aggregate
    benchmark(fn, *banks)


@pytest.mark.benchmark(group="calibrated_aggregate_samples")
@pytest.mark.parametrize("impl", ["modfuse", "reference"])
def test_calibrated_aggregate_samples(benchmark, impl):
    G = cases.samples(M, 8, 1 << 20)
    fn = modfuse.calibrated_aggregate_samples if impl == "modfuse" else reference.calibrated_aggregate_samples
    benchmark(fn, G)


@pytest.mark.benchmark(group="segment_sq_norms")
@pytest.mark.parametrize("impl", ["modfuse", "foreach_norm"])
def test_segment_sq_norms(benchmark, impl):
    flat, offsets, tensors = cases.resnet18_like()
    if impl == "modfuse":
        benchmark(modfuse.segment_sq_norms, flat, offsets)
    else:
        benchmark(torch._foreach_norm, tensors)


@pytest.mark.benchmark(group="moments")
def test_moments(benchmark):
    benchmark(modfuse.moments, cases.samples(M, 4, 1 << 20))


@pytest.mark.benchmark(group="gram")
def test_gram(benchmark):
    benchmark(modfuse.gram, cases.samples(M, 1, D)[:, 0].contiguous())


@pytest.mark.benchmark(group="weighted_sum")
def test_weighted_sum(benchmark):
    benchmark(modfuse.weighted_sum, cases.samples(M, 1, D)[:, 0].contiguous(), torch.tensor([0.5, 1.0, 2.0]))
