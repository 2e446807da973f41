"""Op 1b, tensor_sq_norms: squared norms of a list of tensors read where they are, against the reference and
torch._foreach_norm, on every backend that has the op."""

import pytest
import torch
from conftest import DTYPE_IDS, DTYPES, assert_close

import modfuse as mf
from modfuse import reference

LISTS = {
    "one element": [(1,)],
    "odd and 0-d": [(7,), (3, 5), ()],
    "past the blocks": [(4099,), (64, 3, 3, 3), (0,), (33_000,), (1, 1)],
    "large": [((1 << 20) + 3,), (5,), (2, 32769)],  # not a multiple of any block size
}


def acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_norms(out, tensors, dtype):
    assert out.dtype == acc(dtype) and out.shape == (len(tensors),)
    expected = reference.tensor_sq_norms([t.cpu().double() for t in tensors])
    # a sum of squares has no cancellation: every tensor against its own magnitude
    for p in range(len(tensors)):
        assert_close(out[p], expected[p], acc(dtype), rtol=1e-10 if dtype == torch.float64 else 1e-5)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shapes", list(LISTS.values()), ids=list(LISTS))
def test_matches_reference(shapes, dtype, gen, target):
    target.skip_unless("tensor_sq_norms")
    tensors = [target(torch.randn(s, generator=gen).to(dtype)) for s in shapes]
    out = mf.tensor_sq_norms(tensors, backend=target.backend)
    assert out.device == target.device
    check_norms(out, tensors, dtype)


def test_empty_tensors_give_zero_not_poison(target):
    """Every output element is written (the conftest fills fresh allocations with NaN)."""
    target.skip_unless("tensor_sq_norms")
    out = mf.tensor_sq_norms([target(torch.ones(0)), target(torch.ones(2, 0)), target(torch.ones(3))])
    assert out.tolist() == [0.0, 0.0, 3.0]


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_noncontiguous(dtype, gen, target):
    """Dense tensors in another dimension order are read in place; gapped views (slices, expanded) are copied."""
    target.skip_unless("tensor_sq_norms")
    base = torch.randn(6, 4099, generator=gen).to(dtype)
    image = torch.randn(2, 3, 5, 7, generator=gen).to(dtype)
    tensors = [
        target(base).t(),  # transposed: dense, read in place
        target(image).to(memory_format=torch.channels_last),  # dense in another order
        target(base)[:, ::2],  # every other column: gaps
        target(base)[1:4, 7:3000],  # a window
        target(torch.randn(1, 33, generator=gen).to(dtype)).expand(4, 33),  # stride 0: each value 4 times
        target(base).t()[::3],
    ]
    assert not any(t.is_contiguous() for t in tensors)
    check_norms(mf.tensor_sq_norms(tensors, backend=target.backend), tensors, dtype)


def test_resnet18_like_matches_foreach_norm(gen, target):
    """62 tensors, 11.7M elements: the numbers torch._foreach_norm gives, squared."""
    target.skip_unless("tensor_sq_norms")
    sizes = [9408, 64, 64] + [36864, 64, 64] * 4 + [73728, 128, 128, 147456, 128, 128, 8192, 128, 128]
    sizes += [147456, 128, 128] * 2 + [294912, 256, 256, 589824, 256, 256, 32768, 256, 256]
    sizes += [589824, 256, 256] * 2 + [1179648, 512, 512, 2359296, 512, 512, 131072, 512, 512]
    sizes += [2359296, 512, 512] * 2
    sizes = sizes[:61] + [11_700_000 - sum(sizes[:61])]
    tensors = [target(torch.randn(n, generator=gen)) for n in sizes]
    expected = torch.stack(torch._foreach_norm([t.cpu().double() for t in tensors])).square()
    assert_close(mf.tensor_sq_norms(tensors, backend=target.backend), expected, torch.float32, rtol=1e-5)


def test_nan_propagates_to_its_tensor_only(gen, target):
    target.skip_unless("tensor_sq_norms")
    tensors = [target(torch.randn(40, generator=gen)) for _ in range(3)]
    tensors[1][17] = float("nan")
    out = mf.tensor_sq_norms(tensors, backend=target.backend)
    assert out[1].isnan() and out[[0, 2]].isfinite().all()
    with pytest.raises(ValueError, match=r"tensors\[1\] has NaN or Inf"):
        mf.tensor_sq_norms(tensors, check_finite=True, backend=target.backend)


def test_bad_arguments_name_the_argument():
    x = torch.randn(3)
    with pytest.raises(ValueError, match="tensors must hold at least one tensor"):
        mf.tensor_sq_norms([])
    with pytest.raises(TypeError, match="tensors must be a list or tuple of torch.Tensor, got Tensor"):
        mf.tensor_sq_norms(x)
    with pytest.raises(TypeError, match=r"tensors\[1\] must be a torch.Tensor, got float"):
        mf.tensor_sq_norms([x, 1.0])
    with pytest.raises(TypeError, match=r"tensors\[1\] has dtype float64 but tensors\[0\] has float32"):
        mf.tensor_sq_norms([x, x.double()])
    with pytest.raises(TypeError, match=r"tensors\[0\] must have dtype"):
        mf.tensor_sq_norms([torch.arange(3)])
    with pytest.raises(ValueError, match=r"tensors\[1\] is on meta but tensors\[0\] is on cpu"):
        mf.tensor_sq_norms([x, torch.empty(3, device="meta")])
    # the compiled op's own guard, for a direct torch.ops call
    with pytest.raises(RuntimeError, match="empty list of Tensors"):  # the dispatcher refuses it first
        torch.ops.modfuse.tensor_sq_norms([])
    with pytest.raises(RuntimeError, match="first one's dtype"):
        torch.ops.modfuse.tensor_sq_norms([x, x.double()])


def test_result_independent_of_thread_count(gen):
    tensors = [torch.randn(n, generator=gen) for n in (1, 250_000, 50_001, 7)]
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = mf.tensor_sq_norms(tensors)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, mf.tensor_sq_norms(tensors))


def test_agrees_with_segment_sq_norms(gen):
    tensors = [torch.randn(n, generator=gen) for n in (3, 70_000, 32768, 1)]
    offsets = torch.tensor([0] + [t.numel() for t in tensors]).cumsum(0)
    expected = mf.segment_sq_norms(torch.cat(tensors), offsets)
    torch.testing.assert_close(mf.tensor_sq_norms(tensors), expected, rtol=1e-6, atol=0)
