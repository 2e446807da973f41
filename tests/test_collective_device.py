"""Where the Balancer's small CPU tensors go for a collective: NCCL has no CPU path, so under it they are staged on
the current accelerator; gloo, mpi and per-device backends with a CPU part keep them on the CPU (issue 11).

No GPU here: the backend string and the accelerator are stubbed; the NCCL path itself runs only on a multi-GPU
machine."""

from __future__ import annotations

import types

import pytest
import torch

from modfuse import groups


@pytest.mark.parametrize(
    "backend, accelerator, expected",
    [
        ("gloo", None, "cpu"),
        ("mpi", None, "cpu"),
        ("cpu:gloo,cuda:nccl", "cuda", "cpu"),
        ("CUDA:NCCL, CPU:GLOO", "cuda", "cpu"),
        ("nccl", "cuda", "cuda:1"),
        ("cuda:nccl", "cuda", "cuda:1"),
        ("xccl", "xpu", "xpu:1"),
    ],
)
def test_collective_device(monkeypatch, backend, accelerator, expected):
    monkeypatch.setattr(groups.dist, "get_backend", lambda *a: backend)
    stub = types.SimpleNamespace(
        is_available=lambda: accelerator is not None,
        current_accelerator=lambda: None if accelerator is None else torch.device(accelerator),
        current_device_index=lambda: 1,
    )
    monkeypatch.setattr(groups.torch, "accelerator", stub)
    assert groups.collective_device() == torch.device(expected)


def test_collective_device_without_a_cpu_path_or_accelerator(monkeypatch):
    monkeypatch.setattr(groups.dist, "get_backend", lambda *a: "nccl")
    stub = types.SimpleNamespace(is_available=lambda: False, current_accelerator=lambda: None)
    monkeypatch.setattr(groups.torch, "accelerator", stub)
    with pytest.raises(RuntimeError, match="backend 'nccl' has no CPU path"):
        groups.collective_device()


def test_collective_device_follows_the_model_under_nccl(monkeypatch):
    """A script that moved the model with .to(f"cuda:{rank}") without torch.cuda.set_device has current device 0
    on every rank: the model's device, not the current one, as DDP does."""
    monkeypatch.setattr(groups.dist, "get_backend", lambda *a: "nccl")
    stub = types.SimpleNamespace(
        is_available=lambda: True, current_accelerator=lambda: torch.device("cuda"), current_device_index=lambda: 0
    )
    monkeypatch.setattr(groups.torch, "accelerator", stub)
    assert groups.collective_device(torch.device("cuda", 3)) == torch.device("cuda", 3)
    assert groups.collective_device(torch.device("cpu")) == torch.device("cuda", 0)
    monkeypatch.setattr(groups.dist, "get_backend", lambda *a: "gloo")
    assert groups.collective_device(torch.device("cuda", 3)) == torch.device("cpu")
