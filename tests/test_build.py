"""The compiled extension is there and the NaN poisoning the other tests rely on is active."""

import torch

import modfuse
from modfuse import _C


def test_extension_loaded_and_reports_build():
    assert "cpu" in modfuse.available_backends()
    assert isinstance(_C.with_cuda, bool)
    assert _C.openmp, "built without OpenMP: at::parallel_for would run on one thread"
    assert _C.torch_version.split("+")[0].split(".")[:2] == torch.__version__.split("+")[0].split(".")[:2]


def test_uninitialized_memory_is_poisoned():
    assert torch.empty(1000).isnan().all()
    assert torch.empty(10, dtype=torch.bfloat16).isnan().all()
