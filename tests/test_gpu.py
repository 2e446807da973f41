"""GPU-only properties of the CUDA and Triton kernels (the shared matrix in test_<op>.py covers the values).

- results repeat bit for bit from run to run (two-stage reductions, no float atomics);
- 64-bit indexing: D > 2^31 elements per row does not overflow;
- torch.compile traces the Triton ops (triton_op + wrap_triton) in one graph;
- the Balancer runs a training step on CUDA with the CUDA kernels.
Skipped without a GPU (and the CUDA-kernel tests without a CUDA build of modfuse._C).
"""

from __future__ import annotations

import pytest
import torch
from conftest import TARGETS, Target, assert_close, gradient_samples

import modfuse as mf
from modfuse import reference

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
GPU_TARGETS = [t for t in TARGETS if t.id != "cpu"]


@pytest.fixture(params=GPU_TARGETS)
def gpu(request) -> Target:
    return Target(*request.param)


def test_results_repeat_bit_for_bit(gpu, gen):
    G = gradient_samples(3, 5, 3_000_001, torch.float32, gen)
    S1, S2 = (gpu(t) for t in reference.moments(G))
    x = gpu(G[0])
    off = [0, 1, 1_000_000, 3_000_001]
    # each op twice on the same input: the second call must give the same bits
    a = mf.calibrated_aggregate(S1, S2, [5] * 3, return_uncertainty=True, backend=gpu.backend)
    b = mf.calibrated_aggregate(S1, S2, [5] * 3, return_uncertainty=True, backend=gpu.backend)
    assert all(torch.equal(p, q) for p, q in zip(a, b))
    assert torch.equal(
        mf.segment_sq_norms(x, off, backend=gpu.backend), mf.segment_sq_norms(x, off, backend=gpu.backend)
    )
    X = x[:4]
    assert torch.equal(mf.gram(X, backend=gpu.backend), mf.gram(X, backend=gpu.backend))


def _memory_for(bytes_needed: int) -> bool:
    free, _ = torch.cuda.mem_get_info()
    return free > bytes_needed * 1.2


def test_rows_longer_than_2_to_the_31(gpu):
    """fp16 rows of 2^31 + 7 elements: indices past 2^31 must address the right memory."""
    D = (1 << 31) + 7
    if not _memory_for(3 * 2 * D):
        pytest.skip("not enough GPU memory for 3 fp16 buffers of 2^31 elements")
    tail = torch.randn(1000, generator=torch.Generator().manual_seed(0))
    x = torch.zeros(1, D, dtype=torch.float16, device="cuda")
    x[0, -1000:] = tail.half().cuda()
    out = mf.segment_sq_norms(x, [0, D - 1000, D], backend=gpu.backend)
    assert out[0, 0].item() == 0
    assert_close(out[0, 1:], tail.half().double().square().sum().reshape(1), torch.float32, rtol=1e-5)
    del x
    S1 = torch.zeros(1, D, dtype=torch.float16, device="cuda")
    S2 = torch.zeros(1, D, dtype=torch.float16, device="cuda")
    S1[0, -1000:] = (4 * tail).half().cuda()
    S2[0, -1000:] = (4 * tail).square().add(1).half().cuda()
    out, stats = mf.calibrated_aggregate(S1, S2, [4], backend=gpu.backend)
    expected = reference.calibrated_aggregate(S1[:, -1000:].double().cpu(), S2[:, -1000:].double().cpu(), [4])[0]
    assert_close(out[-1000:], expected, torch.float16)
    assert (out[:-1000] == 0).all()


def test_torch_compile_traces_the_triton_ops(gen):
    pytest.importorskip("triton")
    S1, S2 = (t.cuda() for t in reference.moments(gradient_samples(2, 5, 10_000, torch.float32, gen)))
    n = torch.full((2,), 5.0, device="cuda")
    import modfuse.triton

    modfuse.triton.load()

    def f(S1, S2):
        out, stats, _ = torch.ops.modfuse_triton.calibrated_aggregate(S1, S2, n, 1.0, 1e-20, 1e6, False)
        return out * 2, torch.ops.modfuse_triton.gram(S1)

    explanation = torch._dynamo.explain(f)(S1, S2)
    assert explanation.graph_count == 1 and explanation.graph_break_count == 0
    compiled = torch.compile(f, fullgraph=True)(S1, S2)
    eager = f(S1, S2)
    torch.testing.assert_close(compiled[0], eager[0])
    torch.testing.assert_close(compiled[1], eager[1])


def test_balancer_step_on_cuda():
    """calibrated (per-sample moments and Op 4 on CUDA) gives the CPU run's gradients for the same model and batch."""
    from _models import SharedHeadNet, batch, losses

    dims = {"a": 6, "b": 9}
    grads = {}
    for device in ("cpu", "cuda"):
        torch.manual_seed(0)
        net = SharedHeadNet(dims).double().to(device)
        balancer = mf.Balancer(net, encoders=dict(net.enc), shared=net.head, method="calibrated", moments="per_sample")
        xs, y = batch(dims)
        xs = {m: x.double().to(device) for m, x in xs.items()}
        assert balancer.backward(**losses(net, xs, y.to(device)))
        grads[device] = {n: p.grad.cpu() for n, p in net.named_parameters()}
    for name, g in grads["cpu"].items():
        torch.testing.assert_close(grads["cuda"][name], g, rtol=1e-9, atol=1e-12, msg=name)
