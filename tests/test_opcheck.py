"""torch.library.opcheck on every op: schema, fake (meta) kernels, and torch.compile / AOT dispatch."""
import pytest
import torch

import modfuse  # noqa: F401  (registers the ops)

g = torch.Generator().manual_seed(0)


def rand(*shape, dtype=torch.float32):
    return torch.randn(*shape, generator=g).to(dtype)


CASES = {
    "segment_sq_norms": lambda dt: (rand(3, 17, dtype=dt), torch.tensor([0, 5, 5, 17])),
    "moments": lambda dt: (rand(3, 4, 17, dtype=dt),),
    "moments_accumulate_": lambda dt: (torch.zeros(3, 17), torch.zeros(3, 17), rand(3, 17, dtype=dt)),
    "linear_moments": lambda dt: (rand(5, 3, 7, dtype=dt), rand(5, 3, 4, dtype=dt)),
    "calibrated_aggregate": lambda dt: (rand(3, 17, dtype=dt), (rand(3, 17) ** 2 + 1).to(dt), torch.full((3,), 4.0),
                                        1.0, None, 1e6, True),
    "calibrated_aggregate_samples": lambda dt: (rand(3, 5, 17, dtype=dt), 0.5, None, 1e6, False),
    "gram": lambda dt: (rand(4, 33, dtype=dt),),
    "weighted_sum": lambda dt: (rand(3, 33, dtype=dt), rand(3)),
    "segment_scale_": lambda dt: (rand(33, dtype=dt), torch.tensor([0, 10, 33]), torch.tensor([0.5, 2.0]),
                                  rand(33), torch.tensor([0.1, 0.2])),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_opcheck(name, dtype):
    torch.library.opcheck(getattr(torch.ops.modfuse, name).default, CASES[name](dtype))


def test_compiled_call_has_no_graph_break():
    import torch._dynamo

    def step(S1, S2, n):
        out, stats, _ = torch.ops.modfuse.calibrated_aggregate(S1, S2, n, 1.0, None, 1e6, False)
        return out * 2, stats

    explanation = torch._dynamo.explain(step)(rand(2, 40), rand(2, 40) ** 2 + 1, torch.full((2,), 3.0))
    assert explanation.graph_break_count == 0
