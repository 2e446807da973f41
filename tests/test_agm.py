"""AGM against plain-PyTorch transcriptions of the authors' formulas (ICCV 2023 code, 2 and 3 modalities)."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from _models import SharedHeadNet, balancer_for, batch, losses

from modfuse.methods.agm import coefficients, shapley_responses


def masked(net, xs, kept):
    with torch.no_grad():
        return net({m: x if m in kept else torch.zeros_like(x) for m, x in xs.items()})[0]


def test_shapley_responses_are_the_authors_two_and_three_modality_forms():
    torch.manual_seed(0)
    dims = {"a": 5, "v": 7, "t": 4}
    net = SharedHeadNet(dims).double()
    xs, _ = batch(dims, seed=1)
    xs = {m: x.double() for m, x in xs.items()}
    f = {k: masked(net, xs, k) for k in ("avt", "av", "at", "vt", "a", "v", "t")}
    phi = shapley_responses(lambda d: net(d)[0], xs, list(dims), f["avt"])
    # the authors' Modality_Audio / Visual / Text (3 modalities, f(empty) = 0)
    torch.testing.assert_close(
        phi["a"], (f["avt"] - f["vt"]) / 3 + (f["av"] - f["v"] + f["at"] - f["t"]) / 6 + f["a"] / 3
    )
    torch.testing.assert_close(
        phi["v"], (f["avt"] - f["at"]) / 3 + (f["av"] - f["a"] + f["vt"] - f["t"]) / 6 + f["v"] / 3
    )
    torch.testing.assert_close(
        phi["t"], (f["avt"] - f["av"]) / 3 + (f["vt"] - f["v"] + f["at"] - f["a"]) / 6 + f["t"] / 3
    )
    torch.testing.assert_close(phi["a"] + phi["v"] + phi["t"], f["avt"])  # efficiency of the Shapley value
    two = {"a": 5, "v": 7}
    net2 = SharedHeadNet(two).double()
    xs2 = {m: xs[m] for m in two}
    full, pad_v, pad_a = masked(net2, xs2, "av"), masked(net2, xs2, "a"), masked(net2, xs2, "v")
    phi2 = shapley_responses(lambda d: net2(d)[0], xs2, list(two), full)
    torch.testing.assert_close(phi2["a"], 0.5 * (full - pad_a + pad_v))  # Modality_Audio_2
    torch.testing.assert_close(phi2["v"], 0.5 * (full - pad_v + pad_a))  # Modality_Visual_2


@pytest.mark.parametrize("M", [2, 3])
def test_coefficients_are_the_authors(M):
    g = torch.Generator().manual_seed(M)
    s = torch.rand(M, generator=g, dtype=torch.float64) * 2
    t = torch.rand(M, generator=g, dtype=torch.float64) * 2
    k = coefficients(s, t, 0.7)
    for m in range(M):
        ratio = math.exp((float(s.mean()) - float(s[m])) * M / (M - 1))
        optimal = math.exp((float(t.mean()) - float(t[m])) * M / (M - 1))
        assert float(k[m]) == pytest.approx(math.exp(0.7 * min(optimal - ratio, 7)), rel=1e-12)


def test_agm_scales_each_encoders_fused_gradient_and_keeps_the_running_scores():
    dims = {"a": 5, "b": 7, "c": 4}
    torch.manual_seed(2)
    net = SharedHeadNet(dims).double()
    b = balancer_for(net, "agm", alpha=0.5)
    running = torch.zeros(3, dtype=torch.float64)
    for step in range(1, 4):
        xs, y = batch(dims, seed=10 + step)
        xs = {m: x.double() for m, x in xs.items()}
        kw = losses(net, xs, y)
        del kw["unimodal"]  # the authors' objective: the fused loss only (passed unimodal losses would be added)
        fused = kw["fused_logits"]
        f = {}
        for r in range(1, 4):
            for S in itertools.combinations(dims, r):
                f[S] = fused.detach() if len(S) == 3 else masked(net, xs, S)
        f[()] = torch.zeros_like(fused)
        scores = []
        for m in dims:
            others = [j for j in dims if j != m]
            phi = 0
            for r in range(3):
                w = math.factorial(r) * math.factorial(3 - r - 1) / math.factorial(3)
                for S in itertools.combinations(others, r):
                    with_m = tuple(j for j in dims if j in (*S, m))
                    phi = phi + w * (f[with_m] - f[S])
            p = torch.softmax(phi, 1)[torch.arange(len(y)), y]
            scores.append(float(-torch.log(torch.clamp(p, min=1e-8)).mean()))
        s = torch.tensor(scores, dtype=torch.float64)
        k = [
            math.exp(
                0.5
                * min(
                    math.exp((float(running.mean()) - float(running[i])) * 1.5)
                    - math.exp((float(s.mean()) - float(s[i])) * 1.5),
                    7,
                )
            )
            for i in range(3)
        ]
        plain = torch.autograd.grad(F.cross_entropy(fused, y), list(net.parameters()), retain_graph=True)
        net.zero_grad(set_to_none=True)
        assert b.backward(**kw)
        for (n, p), g in zip(net.named_parameters(), plain):
            scale = next((k[i] for i, m in enumerate(dims) if n.startswith(f"enc.{m}.")), 1.0)
            torch.testing.assert_close(p.grad, g * scale, rtol=1e-9, atol=1e-12)
        running = running * (step - 1) / step + s / step
        torch.testing.assert_close(b.method.running, running, rtol=1e-12, atol=0)
        with torch.no_grad():
            for p in net.parameters():
                p.sub_(0.1 * p.grad)
