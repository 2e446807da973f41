import pytest
import torch
from conftest import DTYPE_IDS, DTYPES, assert_close, noncontiguous

import modfuse as mf
from modfuse import reference


def per_sample_grads(x, gy):
    """nn.Linear per-sample weight/bias gradients by autograd, one sample at a time (the independent oracle)."""
    layer = torch.nn.Linear(x.shape[-1], gy.shape[-1]).double()
    Ws, bs = [], []
    for n in range(x.shape[0]):
        layer.zero_grad()
        layer(x[n].double()).backward(gy[n].double())
        Ws.append(layer.weight.grad.clone())
        bs.append(layer.bias.grad.clone())
    return torch.stack(Ws), torch.stack(bs)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape", [(1, None, 1, 1), (9, None, 7, 5), (6, 4, 7, 5), (3, 17, 33, 2)])
def test_matches_per_sample_gradients(shape, dtype, gen, target):
    N, T, I, O = shape
    lead = (N,) if T is None else (N, T)
    x = torch.randn(*lead, I, generator=gen).to(dtype)
    gy = torch.randn(*lead, O, generator=gen).to(dtype)
    S1, S2, B1, B2 = mf.linear_moments(target(x), target(gy), bias=True, backend=target.backend)
    W, b = per_sample_grads(x, gy)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    rtol = 1e-10 if dtype == torch.float64 else 1e-5
    for got, want in ((S1, W.sum(0)), (S2, W.square().sum(0)), (B1, b.sum(0)), (B2, b.square().sum(0))):
        assert got.dtype == acc
        assert_close(got, want, acc, rtol=rtol)
    # and the reference agrees with autograd too
    r = reference.linear_moments(x.double(), gy.double())
    assert_close(r[1], W.square().sum(0), torch.float64, rtol=1e-10)


def test_noncontiguous_and_two_outputs_by_default(gen, target):
    x = noncontiguous(torch.randn(6, 3, 8, generator=gen))
    gy = noncontiguous(torch.randn(6, 3, 4, generator=gen))
    out = mf.linear_moments(noncontiguous(target(x)), noncontiguous(target(gy)), backend=target.backend)
    assert len(out) == 2
    r = reference.linear_moments(x.double(), gy.double())
    assert_close(out[0], r[0], torch.float32, rtol=1e-5)
    assert_close(out[1], r[1], torch.float32, rtol=1e-5)


def test_mixed_autocast_dtypes(gen, target):
    x = torch.randn(5, 6, generator=gen)
    gy = torch.randn(5, 3, generator=gen).bfloat16()
    S1, S2 = mf.linear_moments(target(x), target(gy), backend=target.backend)
    r = reference.linear_moments(x.double(), gy.double())
    assert S1.dtype == torch.float32
    assert_close(S2, r[1], torch.float32, rtol=1e-5)


@pytest.mark.parametrize("gy_scale,x_scale", [(1e20, 1e-10), (1e-10, 1e20), (1e25, 1e-22), (3e-30, 1e21)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_squares_do_not_overflow_where_the_products_are_finite(gy_scale, x_scale, dtype, gen, target):
    """Issue 14 item 4: T = 1 formed (gy^2)^T (x^2), inf where the reference's W_n^2 = (gy_n x_n)^2 is finite."""
    x = (torch.randn(9, 7, generator=gen, dtype=torch.float64) * x_scale).to(dtype)
    gy = (torch.randn(9, 5, generator=gen, dtype=torch.float64) * gy_scale).to(dtype)
    x[4] *= 1e-3  # samples of different magnitudes get their own balancing shift
    S1, S2 = mf.linear_moments(target(x), target(gy), backend=target.backend)
    r = reference.linear_moments(x.double(), gy.double())
    assert S2.isfinite().all()
    assert_close(S1, r[0], torch.float32, rtol=1e-5)
    assert_close(S2, r[1], torch.float32, rtol=1e-5)


def test_squares_overflow_only_where_the_reference_does(gen, target):
    x = torch.full((3, 4), 1e10)
    gy = torch.full((3, 2), 1e10)  # W = 1e20: W^2 = 1e40 is inf in float32, in the reference too
    _, S2 = mf.linear_moments(target(x), target(gy), backend=target.backend)
    assert torch.isinf(S2).all() and torch.isinf(reference.linear_moments(x, gy)[1]).all()


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape", [(1, None, 1, 1), (9, None, 7, 5), (6, 4, 7, 5)])
def test_s1_from_the_ordinary_weight_gradient(shape, dtype, gen, target):
    """Issue 15: s1 = the weight gradient of the summed loss from a plain backward is returned as S1 (itself when it
    has the accumulation dtype, no copy) and S2 is unchanged: the op forms only S2."""
    N, T, I, O = shape
    lead = (N,) if T is None else (N, T)
    x = torch.randn(*lead, I, generator=gen).to(dtype)
    gy = torch.randn(*lead, O, generator=gen).to(dtype)
    layer = torch.nn.Linear(I, O, bias=False).to(dtype)
    (layer(x) * gy).sum().backward()  # output gradient gy: weight.grad = sum_n W_n in x's dtype
    s1 = target(layer.weight.grad)
    S1, S2, B1, B2 = mf.linear_moments(target(x), target(gy), bias=True, s1=s1, backend=target.backend)
    assert S1.dtype == S2.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert torch.equal(S1, s1.to(S1.dtype))
    assert (S1.data_ptr() == s1.data_ptr()) == (s1.dtype == S1.dtype)
    # the compiled op itself leaves S1 empty (the caller has it)
    if target.backend != "triton":
        assert torch.ops.modfuse.linear_moments(target(x), target(gy), s1)[0].numel() == 0
    r = reference.linear_moments(x.double(), gy.double())
    rtol = 1e-10 if dtype == torch.float64 else 1e-5
    for got, want in ((S2, r[1]), (B1, r[2]), (B2, r[3])):
        assert_close(got, want, S2.dtype, rtol=rtol)
    # and it is the S1 the op would have formed itself, to the weight gradient's own precision
    assert_close(S1, r[0], dtype)


def test_s1_bad_arguments_name_it(gen):
    x, gy = torch.randn(4, 3, generator=gen), torch.randn(4, 2, generator=gen)
    with pytest.raises(ValueError, match=r"s1 must have shape \[O, I\] \(the weight gradient\) = \(2, 3\)"):
        mf.linear_moments(x, gy, s1=torch.zeros(3, 2))
    with pytest.raises(TypeError, match="s1 must be a torch.Tensor"):
        mf.linear_moments(x, gy, s1=[[0.0] * 3] * 2)
    with pytest.raises(TypeError, match="s1 must have dtype"):
        mf.linear_moments(x, gy, s1=torch.zeros(2, 3, dtype=torch.int64))
    with pytest.raises(ValueError, match="s1 is on meta but x is on cpu"):
        mf.linear_moments(x, gy, s1=torch.zeros(2, 3, device="meta"))
