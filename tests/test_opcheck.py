"""torch.library.opcheck on every op for every backend present: schema, fake (meta) kernels, and torch.compile /
AOT dispatch, on the CPU kernels, the CUDA kernels (a GPU and a CUDA build) and the Triton kernels (a GPU, or
Triton's interpreter on the CPU). Also: one list of op names, one (op, backend) table, all of it registered."""

import importlib.util

import pytest
import torch

import modfuse
from modfuse import ops

g = torch.Generator().manual_seed(0)


def rand(*shape, dtype=torch.float32):
    return torch.randn(*shape, generator=g).to(dtype)


CASES = {
    "segment_sq_norms": lambda dt: (rand(3, 17, dtype=dt), torch.tensor([0, 5, 5, 17])),
    "tensor_sq_norms": lambda dt: (
        [rand(3, 17, dtype=dt), rand(1, dtype=dt).reshape(()), rand(4, 5, 2, dtype=dt).transpose(0, 2)],
    ),
    "moments": lambda dt: (rand(3, 4, 17, dtype=dt),),
    "moments_accumulate_": lambda dt: (torch.zeros(3, 17), torch.zeros(3, 17), rand(3, 17, dtype=dt)),
    "linear_moments": lambda dt: (rand(5, 3, 7, dtype=dt), rand(5, 3, 4, dtype=dt)),
    "linear_moments_s1": lambda dt: (rand(5, 7, dtype=dt), rand(5, 4, dtype=dt), rand(4, 7, dtype=dt)),
    "calibrated_aggregate": lambda dt: (
        rand(3, 17, dtype=dt),
        (rand(3, 17) ** 2 + 1).to(dt),
        torch.full((3,), 4.0),
        1.0,
        None,
        1e6,
        True,
    ),
    # out=: the result written into a caller's buffer (a mutable argument; the first return is then empty)
    "calibrated_aggregate_out": lambda dt: (
        rand(3, 17, dtype=dt),
        (rand(3, 17) ** 2 + 1).to(dt),
        torch.full((3,), 4.0),
        1.0,
        None,
        1e6,
        False,
        torch.full((17,), float("nan")).to(dt),
    ),
    "calibrated_aggregate_samples": lambda dt: (rand(3, 5, 17, dtype=dt), 0.5, None, 1e6, False),
    "gram": lambda dt: (rand(4, 33, dtype=dt),),
    "weighted_sum": lambda dt: (rand(3, 33, dtype=dt), rand(3)),
    "segment_scale_": lambda dt: (
        rand(33, dtype=dt),
        torch.tensor([0, 10, 33]),
        torch.tensor([0.5, 2.0]),
        torch.tensor([0.1, 0.2]),
        2**63 + 5 - 2**64,  # a seed past 2^63, as its int64 bits
        123,
    ),
    "segment_moments": lambda dt: (rand(3, 17, dtype=dt), torch.tensor([0, 5, 5, 17])),
}


def op_of(case: str) -> str:
    """The op a case runs: a case name is the op's, or the op's with a variant suffix (_s1, _out)."""
    return case.removesuffix("_s1").removesuffix("_out")


def on(device, args):
    """Arguments on `device` (lists of tensors too), except int64 offsets: the kernels read segment bounds on the
    host."""

    def move(a):
        if isinstance(a, list):
            return [move(t) for t in a]
        return a.to(device) if isinstance(a, torch.Tensor) and a.dtype != torch.int64 else a

    return tuple(move(a) for a in args)


def triton_args(name, args):
    """The Triton ops' arguments: Op 1 takes its piece table as device tensors, Op 4 a resolved eps."""
    from modfuse.triton.segment_sq_norms import piece_tensors

    if name == "segment_sq_norms":
        return (args[0], *piece_tensors(args[1], args[0].device))
    if op_of(name) == "calibrated_aggregate":
        return (*args[:4], 1e-20, *args[5:])
    return args


needs_cuda = pytest.mark.skipif(
    not (torch.cuda.is_available() and ops._cuda_built()), reason="needs a GPU and a CUDA build of modfuse._C"
)
triton_here = importlib.util.find_spec("triton") is not None and (
    torch.cuda.is_available() or __import__("os").environ.get("TRITON_INTERPRET") == "1"
)
BACKEND_PARAMS = [pytest.param("cpu", id="cpu"), pytest.param("cuda", id="cuda", marks=needs_cuda)]


def test_every_op_has_one_name_and_a_kernel_per_backend():
    registered = {
        name.split("::")[1].split(".")[0]
        for name in torch._C._dispatch_get_all_op_names()
        if name.startswith("modfuse::")
    }
    assert registered == set(ops.OPS) == {op_of(name) for name in CASES}
    for op in ops.OPS:
        assert {b for (o, b) in ops.KERNELS if o == op} >= {"cpu", "cuda", "reference"}
        assert callable(getattr(ops, op)) and callable(getattr(modfuse, op))
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"modfuse::{op}", "CPU")
        if ops._cuda_built():
            assert torch._C._dispatch_has_kernel_for_dispatch_key(f"modfuse::{op}", "CUDA")
    from modfuse import triton as triton_backend

    assert set(ops.TRITON_OPS) == set(triton_backend.OPS)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_opcheck(name, dtype, backend):
    # offsets stay on the host (the kernels read segment bounds there); every other tensor goes to the device
    args = on(backend, CASES[name](dtype))
    torch.library.opcheck(getattr(torch.ops.modfuse, op_of(name)).default, args)


@pytest.mark.skipif(not triton_here, reason="needs triton and a GPU or TRITON_INTERPRET=1")
@pytest.mark.parametrize("name", sorted(ops.TRITON_OPS) + ["linear_moments_s1", "calibrated_aggregate_out"])
def test_opcheck_triton(name):
    from modfuse import triton as triton_backend

    triton_backend.load()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    # float32 only: the interpreter has no bfloat16 arithmetic (the GPU matrix covers bfloat16). The interpreter
    # also launches kernels eagerly on fake tensors (it reads their data), so the fake-tensor and AOT checks of
    # the Triton ops need a GPU; on the CPU: schema and autograd registration.
    args = triton_args(name, on(device, CASES[name](torch.float32)))
    utils = None if device == "cuda" else ("test_schema", "test_autograd_registration")
    torch.library.opcheck(
        getattr(torch.ops.modfuse_triton, op_of(name)).default,
        args,
        **({} if utils is None else {"test_utils": utils}),
    )


def test_compiled_counts_check_raises_in_the_graph():
    """Inside torch.compile the count check of Op 4 cannot branch on values: it is an in-graph assert."""
    step = torch.compile(lambda S1, S2, n: ops.calibrated_aggregate(S1, S2, n)[0], fullgraph=True)
    S1, S2 = rand(2, 40), rand(2, 40) ** 2 + 1
    assert step(S1, S2, torch.full((2,), 3.0)).shape == (40,)
    with pytest.raises(RuntimeError, match="count n >= 2"):
        step(S1, S2, torch.tensor([3.0, 1.0]))


def test_compiled_call_has_no_graph_break():
    import torch._dynamo

    def step(S1, S2, n):
        out, stats, _ = torch.ops.modfuse.calibrated_aggregate(S1, S2, n, 1.0, None, 1e6, False)
        return out * 2, stats

    explanation = torch._dynamo.explain(step)(rand(2, 40), rand(2, 40) ** 2 + 1, torch.full((2,), 3.0))
    assert explanation.graph_break_count == 0


def test_compiled_call_with_out_has_no_graph_break():
    import torch._dynamo

    def step(S1, S2, n, out):
        _, stats, _ = torch.ops.modfuse.calibrated_aggregate(S1, S2, n, 1.0, None, 1e6, False, out)
        return out * 2, stats

    explanation = torch._dynamo.explain(step)(rand(2, 40), rand(2, 40) ** 2 + 1, torch.full((2,), 3.0), torch.empty(40))
    assert explanation.graph_break_count == 0
