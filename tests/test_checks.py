"""Bad input: one test per rule, each asserting the error type and that the message names the argument."""

import pytest
import torch

import modfuse as mf


@pytest.fixture
def banks():
    return torch.randn(3, 10), torch.rand(3, 10) + 1


def test_wrong_dtype_names_argument(banks):
    S1, S2 = banks
    with pytest.raises(TypeError, match="S1 must have dtype float16, bfloat16, float32, float64; got int64"):
        mf.calibrated_aggregate(S1.long(), S2, [2, 2, 2])
    with pytest.raises(TypeError, match="S2 must have dtype float32"):
        mf.calibrated_aggregate(S1, S2.double(), [2, 2, 2])
    with pytest.raises(TypeError, match="x must have dtype"):
        mf.segment_sq_norms(torch.ones(4, dtype=torch.int32), [0, 4])
    with pytest.raises(TypeError, match="S1 must have dtype float32, float64"):
        mf.moments_accumulate_(torch.zeros(2, 3, dtype=torch.bfloat16), torch.zeros(2, 3), torch.zeros(2, 3))
    with pytest.raises(TypeError, match=r"w of shape \[R, D\] must have X's dtype float32"):
        mf.weighted_sum(torch.randn(2, 3), torch.randn(2, 3, dtype=torch.float64))
    with pytest.raises(TypeError, match="S1 must be a torch.Tensor"):
        mf.calibrated_aggregate([[1.0]], torch.ones(1, 1), [2])


def test_wrong_shape_names_argument(banks):
    S1, S2 = banks
    with pytest.raises(ValueError, match=r"S2 must have shape S1.shape \[M, D\] = \(3, 10\), got \(3, 9\)"):
        mf.calibrated_aggregate(S1, S2[:, :9], [2, 2, 2])
    with pytest.raises(ValueError, match="S1 must be 2-D"):
        mf.calibrated_aggregate(S1[0], S2[0], [2])
    with pytest.raises(ValueError, match="G must be 3-D"):
        mf.moments(S1)
    with pytest.raises(ValueError, match=r"gy must match x in its leading dims \[N\]"):
        mf.linear_moments(torch.randn(4, 3), torch.randn(5, 2))
    with pytest.raises(ValueError, match=r"w must have shape \[R\]"):
        mf.weighted_sum(torch.randn(3, 4), torch.randn(2))
    with pytest.raises(ValueError, match="X must have 1 <= R <= 64 rows"):
        mf.gram(torch.randn(65, 2))
    with pytest.raises(ValueError, match="S1 must hold between 1 and 16 modalities"):
        mf.calibrated_aggregate(torch.randn(17, 4), torch.rand(17, 4), [2] * 17)
    with pytest.raises(ValueError, match="D >= 1"):
        mf.calibrated_aggregate(torch.randn(2, 0), torch.rand(2, 0), [2, 2])


def test_wrong_device_names_argument(banks):
    S1, S2 = banks
    with pytest.raises(ValueError, match="S2 is on meta but S1 is on cpu"):
        mf.calibrated_aggregate(S1, S2.to("meta"), [2, 2, 2])
    with pytest.raises(ValueError, match="backend='cpu' runs CPU tensors only"):
        mf.gram(torch.randn(2, 3, device="meta"), backend="cpu")


def test_counts_mismatch_and_too_small(banks):
    S1, S2 = banks
    with pytest.raises(ValueError, match=r"n must have shape \[M\] = \(3,\)"):
        mf.calibrated_aggregate(S1, S2, [5, 5])
    with pytest.raises(ValueError, match=r"n\[1\] = 1.0: every modality needs a finite count n >= 2"):
        mf.calibrated_aggregate(S1, S2, torch.tensor([5, 1, 5]))
    with pytest.raises(ValueError, match=r"n\[0\] = nan"):
        mf.calibrated_aggregate(S1, S2, [float("nan"), 3, 3])
    with pytest.raises(ValueError, match="G must hold 2 <= K <= 64 samples along dim 1, got K = 1"):
        mf.calibrated_aggregate_samples(torch.randn(2, 1, 5))
    with pytest.raises(ValueError, match="got K = 65"):
        mf.calibrated_aggregate_samples(torch.randn(2, 65, 5))


@pytest.mark.parametrize(
    "offsets,message",
    [
        ([1, 4, 10], "offsets must start at 0, got offsets\\[0\\] = 1"),
        ([0, 4, 9], "offsets must end at D = 10 .* got offsets\\[-1\\] = 9"),
        ([0, 6, 4, 10], "offsets must not decrease: offsets\\[1\\] = 6 > offsets\\[2\\] = 4"),
        ([0], "offsets must be 1-D with P \\+ 1 >= 2 entries"),
    ],
)
def test_bad_offsets(offsets, message):
    with pytest.raises(ValueError, match=message):
        mf.segment_sq_norms(torch.randn(2, 10), offsets)
    with pytest.raises(ValueError, match=message):
        mf.segment_scale_(torch.randn(10), offsets, [1.0] * (len(offsets) - 1))


def test_offsets_dtype():
    with pytest.raises(TypeError, match="offsets must have dtype int64, got float32"):
        mf.segment_sq_norms(torch.randn(10), torch.tensor([0.0, 10.0]))


def test_noncontiguous_in_place_target_is_rejected():
    S1 = torch.zeros(4, 3).T
    with pytest.raises(ValueError, match="S1 is written in place and must be contiguous"):
        mf.moments_accumulate_(S1, torch.zeros(3, 4), torch.ones(3, 4))
    with pytest.raises(ValueError, match="x is written in place and must be contiguous"):
        mf.segment_scale_(torch.zeros(10)[::2], [0, 5], [1.0])


def test_bad_scalars(banks):
    S1, S2 = banks
    with pytest.raises(ValueError, match="kappa must be finite and > 0, got 0.0"):
        mf.calibrated_aggregate(S1, S2, [2, 2, 2], kappa=0)
    with pytest.raises(ValueError, match="eps must be finite and > 0"):
        mf.calibrated_aggregate(S1, S2, [2, 2, 2], eps=-1.0)
    with pytest.raises(ValueError, match="evidence_max must be > 0"):
        mf.calibrated_aggregate(S1, S2, [2, 2, 2], evidence_max=float("nan"))
    with pytest.raises(TypeError, match="kappa must be a real number"):
        mf.calibrated_aggregate(S1, S2, [2, 2, 2], kappa="one")
    with pytest.raises(ValueError, match="noise_std must be >= 0"):
        mf.segment_scale_(torch.zeros(4), [0, 4], [1.0], noise_std=[-1.0])
    with pytest.raises(ValueError, match=r"scale must have shape \[P\]"):
        mf.segment_scale_(torch.zeros(4), [0, 2, 4], [1.0])


def test_unknown_backend():
    with pytest.raises(
        ValueError, match="backend must be one of 'auto', 'cuda', 'triton', 'cpu', 'reference', got 'gpu'"
    ):
        mf.gram(torch.randn(2, 3), backend="gpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the errors of a machine without a GPU")
def test_forced_gpu_backends_on_cpu_tensors_are_clear_errors():
    with pytest.raises(ValueError, match="backend='cuda' runs CUDA tensors only, got tensors on cpu"):
        mf.gram(torch.randn(2, 3), backend="cuda")
    with pytest.raises(ValueError, match="backend='triton' has no kernel for weighted_sum"):
        mf.weighted_sum(torch.randn(2, 3), torch.ones(2), backend="triton")


def test_bad_input_leaves_in_place_targets_untouched():
    S1, S2 = torch.ones(2, 3), torch.ones(2, 3)
    with pytest.raises(ValueError):
        mf.moments_accumulate_(S1, S2, torch.ones(2, 4))
    assert torch.equal(S1, torch.ones(2, 3)) and torch.equal(S2, torch.ones(2, 3))


def test_direct_op_call_is_guarded_not_crashing():
    """torch.ops.modfuse.* bypasses the Python checks; the C++ guards still refuse instead of reading out of bounds."""
    with pytest.raises(RuntimeError, match="offsets must start at 0 and end at D"):
        torch.ops.modfuse.segment_sq_norms(torch.randn(1, 10), torch.tensor([0, 20]))
    with pytest.raises(RuntimeError, match="every n must be >= 2"):
        torch.ops.modfuse.calibrated_aggregate(torch.randn(2, 3), torch.rand(2, 3), torch.tensor([1.0, 3.0]))
