"""Each method's statistic and gradients against a plain-PyTorch computation on a small model (float64)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from _models import SharedHeadNet, balancer_for, batch, losses

import modfuse
from modfuse.methods.i2m2 import i2m2_log_probs
from modfuse.methods.ogm_ge import concat_head_unimodal_logits, modulation

DIMS = {"a": 5, "b": 7}


def setup(seed=0, N=24, fused_twice=False):
    torch.manual_seed(seed)
    net = SharedHeadNet(DIMS, fused_twice=fused_twice).double()
    xs, y = batch(DIMS, N=N, seed=seed)
    return net, {m: x.double() for m, x in xs.items()}, y


def autograd_grads(loss, params):
    return torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)


def close(a, b, rtol=1e-10):
    torch.testing.assert_close(a, b, rtol=rtol, atol=1e-13)


# ogm_ge ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("ge", [False, True])
def test_ogm_ge_scales_and_perturbs_like_the_official_code(ge):
    net, xs, y = setup()
    fused, uni = net(xs)
    loss = F.cross_entropy(fused, y)
    plain = dict(zip([n for n, _ in net.named_parameters()], autograd_grads(loss, list(net.parameters()))))
    scores = {m: torch.softmax(uni[m].detach(), 1)[torch.arange(len(y)), y].sum() for m in DIMS}
    k = {}
    for m, other in (("a", "b"), ("b", "a")):
        rho = scores[m] / scores[other]
        k[m] = 1 - math.tanh(0.8 * float(rho)) if rho > 1 else 1.0  # noqa
    assert min(k.values()) < 1 == max(k.values())  # one modality modulated, the other not
    b = balancer_for(net, "ogm_ge", ge=ge, seed=7)
    assert b.backward(fused=F.cross_entropy(fused, y, reduction="none"), logits=uni, target=y)
    stream = 0  # the noise stream's counter: the encoders' banks in order (docs/math.md, ogm_ge)
    for m in DIMS:
        prefix = f"enc.{m}."
        names = [n for n, _ in net.named_parameters() if n.startswith(prefix)]
        size = sum(plain[n].numel() for n in names)
        noise = modfuse.reference.normal_noise(size, seed=7, offset=stream, dtype=torch.float64)
        stream += size
        start = 0
        for n in names:
            g = plain[n]
            modulated = g.dim() >= 2
            expected = g * (k[m] if modulated else 1.0)
            if ge and modulated:
                expected = expected + noise[start : start + g.numel()].view_as(g) * (g.std() + 1e-8)
            start += g.numel()
            close(dict(net.named_parameters())[n].grad, expected)
    assert b.stats() == pytest.approx({f"{m}/coefficient": k[m] for m in DIMS})
    for n in ("head.weight", "fuse.bias"):  # not encoder parameters: plain
        close(dict(net.named_parameters())[n].grad, plain[n])


def test_ogm_ge_noise_is_reproducible_from_seed_and_state():
    """Two steps: the noise differs between steps, a fresh Balancer with the same seed repeats it, and restoring
    the method state after step 1 repeats step 2; the std used is the official one (the noise divided back out)."""
    net, xs, y = setup()

    def step(b):
        net.zero_grad()
        fused, uni = net(xs)
        assert b.backward(fused=F.cross_entropy(fused, y, reduction="none"), logits=uni, target=y)
        return [p.grad.clone() for p in net.enc.parameters()]

    b = balancer_for(net, "ogm_ge", seed=3)
    first, second = step(b), step(b)
    assert not all(torch.equal(u, v) for u, v in zip(first, second))
    again = balancer_for(net, "ogm_ge", seed=3)
    assert all(torch.equal(u, v) for u, v in zip(first, step(again)))
    state = again.method.state_dict()
    drawn = sum(p.numel() for p in net.enc.parameters())
    # the offset moves past the drawn counters, rounded up to a multiple of 4 (each step starts a Philox call)
    assert state == {"seed": 3, "offset": (drawn + 3) // 4 * 4, "stream": 2}
    restored = balancer_for(net, "ogm_ge", seed=99)
    restored.method.load_state_dict(state)
    assert all(torch.equal(u, v) for u, v in zip(second, step(restored)))
    with pytest.raises(TypeError, match="'offset'"):
        restored.method.load_state_dict({"seed": 3})
    # a state from before the four-normals stream (no version) would resume with other noise: refused, untouched
    for old in ({"seed": 3, "offset": 8}, {"seed": 3, "offset": 8, "stream": 1}):
        with pytest.raises(ValueError, match="noise stream is version .* set state\\['stream'\\] = 2"):
            restored.method.load_state_dict(old)
        assert restored.method.state_dict() == {"seed": 3, "offset": 2 * ((drawn + 3) // 4 * 4), "stream": 2}


def test_ogm_ge_modulation_forms():
    s = torch.tensor([3.0, 1.0, 2.0], dtype=torch.float64)
    rho = s / torch.tensor([1.5, 2.5, 2.0], dtype=torch.float64)
    jump = modulation(s, 0.5, continuous=False)
    smooth = modulation(s, 0.5, continuous=True)
    close(jump, torch.where(rho > 1, 1 - torch.tanh(0.5 * rho), torch.ones(3, dtype=torch.float64)))
    close(smooth, 1 - torch.tanh(0.5 * torch.relu(rho - 1)))
    assert smooth[0] > jump[0]  # the continuous form is much weaker at the same alpha


def authors_ogm_coefficients(score_a, score_v, alpha):
    """OGM-GE_CVPR2022 main.py, transcribed: (coeff_a, coeff_v) for the (audio, visual) scores."""
    ratio_v = score_v / score_a
    ratio_a = 1 / ratio_v
    if ratio_v > 1:
        return 1.0, 1 - math.tanh(alpha * max(ratio_v, 0.0))
    return 1 - math.tanh(alpha * max(ratio_a, 0.0)), 1.0


@pytest.mark.parametrize("scores", [(2.0, 2.0), (3.0, 1.0), (1.0, 3.0), (0.5, 0.5)])
def test_ogm_ge_coefficients_match_the_official_code_including_a_tie(scores):
    k = modulation(torch.tensor(scores, dtype=torch.float64), 0.8, continuous=False)
    assert k.tolist() == pytest.approx(authors_ogm_coefficients(*scores, 0.8), rel=1e-12)


def test_ogm_ge_tie_with_three_modalities_scales_the_first():
    k = modulation(torch.full((3,), 1.7, dtype=torch.float64), 0.8, continuous=False)
    assert k.tolist() == pytest.approx([1 - math.tanh(0.8), 1.0, 1.0])
    assert modulation(torch.full((3,), 1.7, dtype=torch.float64), 0.8, continuous=True).tolist() == [1.0] * 3


def test_concat_head_unimodal_logits_split_the_head():
    head = torch.nn.Linear(5, 3).double()
    h = {"a": torch.randn(4, 2, dtype=torch.float64), "b": torch.randn(4, 3, dtype=torch.float64)}
    parts = concat_head_unimodal_logits(head, h)
    close(parts["a"] + parts["b"], head(torch.cat([h["a"], h["b"]], 1)))
    close(parts["a"], h["a"] @ head.weight[:, :2].t() + head.bias / 2)


# greedy ---------------------------------------------------------------------------------------------------------
def test_greedy_speeds_and_hold():
    net, xs, y = setup(1)
    fused, _ = net(xs)
    loss = F.cross_entropy(fused, y)
    expected = []
    for m in DIMS:
        params = list(net.enc[m].parameters())
        g = autograd_grads(loss, params)
        expected.append(sum(float(x.square().sum()) for x in g) / sum(float(p.detach().square().sum()) for p in params))
    b = balancer_for(net, "greedy", window_steps=1, threshold=0.0, hold_steps=2)
    speeds_seen = []
    b.method._end_window, end = (lambda: speeds_seen.append(b.method.speeds.clone()) or end()), b.method._end_window
    assert b.backward(fused=F.cross_entropy(fused, y, reduction="none"))
    torch.testing.assert_close(speeds_seen[0], torch.tensor(expected, dtype=torch.float64), rtol=1e-10, atol=0)
    fastest = int(torch.tensor(expected).argmax())
    held = list(DIMS)[fastest]
    d = torch.log10(torch.tensor(expected, dtype=torch.float64))
    assert b.stats()[f"{held}/speed_log_ratio"] == pytest.approx(float(d[fastest] - d.mean()))
    for _ in range(2):  # held for hold_steps steps: its grads stay None, the other encoder trains
        net.zero_grad(set_to_none=True)
        fused, _ = net(xs)
        assert b.backward(fused=F.cross_entropy(fused, y, reduction="none"))
        assert all(p.grad is None for p in net.enc[held].parameters())
        assert all(p.grad is not None for m in DIMS if m != held for p in net.enc[m].parameters())
    net.zero_grad(set_to_none=True)
    fused, _ = net(xs)
    b.backward(fused=F.cross_entropy(fused, y, reduction="none"))
    assert all(p.grad is not None for p in net.parameters())


def allocated_bytes(fn) -> int:
    """Bytes of CPU memory that the ops run by fn() allocate (each op's own allocations, freed later or not), by
    torch's profiler."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return sum(max(e.self_cpu_memory_usage, 0) for e in prof.events())


def test_greedy_reads_gradients_and_parameters_where_they_are():
    """Issue 15: greedy's own work allocates no [2, D] bank and copies no parameter: a greedy step allocates
    what a plain step (method "none") does plus a few bytes per tensor, far less than one copy of the encoders."""
    dims = {"a": 300, "b": 200}
    net = SharedHeadNet(dims, hidden=128)
    xs, y = batch(dims, N=8)
    encoder_bytes = sum(p.numel() * p.element_size() for m in dims for p in net.enc[m].parameters())

    def step_bytes(b):
        def step():
            net.zero_grad(set_to_none=True)
            fused, _ = net(xs)
            assert b.backward(fused=F.cross_entropy(fused, y, reduction="none"))

        step()  # warm-up: lazy state, first-call allocations
        return allocated_bytes(step)

    plain = step_bytes(balancer_for(net, "none"))
    greedy = balancer_for(net, "greedy", window_steps=100)
    extra = step_bytes(greedy) - plain
    assert greedy.method.window_count == 2  # its speeds were computed in both steps (no hold)
    assert extra < encoder_bytes / 8, f"greedy allocated {extra} bytes more than a plain step ({encoder_bytes} B)"


def test_greedy_authors_schedule_sums_from_the_start_and_checks_every_step_from_start_epoch():
    """window_steps=1, cumulative=True, start_epoch=2, threshold=0.01: no hold in epochs 0 and 1 although the
    speeds differ, then at the first step of epoch 2 the fastest encoder is held, judged on speeds summed over
    every step so far (no optimizer step here, so each step adds the same speeds)."""
    net, xs, y = setup(1)
    fused, _ = net(xs)
    loss = F.cross_entropy(fused, y)
    single = []
    for m in DIMS:
        params = list(net.enc[m].parameters())
        g = autograd_grads(loss, params)
        single.append(sum(float(x.square().sum()) for x in g) / sum(float(p.detach().square().sum()) for p in params))
    single = torch.tensor(single, dtype=torch.float64)
    held = list(DIMS)[int(single.argmax())]
    b = balancer_for(net, "greedy", window_steps=1, cumulative=True, start_epoch=2, threshold=0.01, hold_steps=1)

    def step():
        net.zero_grad(set_to_none=True)
        fused, _ = net(xs)
        assert b.backward(fused=F.cross_entropy(fused, y, reduction="none"))

    for _ in range(2):  # epochs 0 and 1: checks are gated off
        for _ in range(2):
            step()
            assert all(p.grad is not None for p in net.parameters())
        b.end_epoch()
    step()  # epoch 2, first step: adds its speeds, then the check holds the fastest for the next step
    torch.testing.assert_close(b.method.speeds, 5 * single, rtol=1e-10, atol=0)
    assert b.method.holds == [int(m == held) for m in DIMS]
    step()
    assert all(p.grad is None for p in net.enc[held].parameters())
    torch.testing.assert_close(b.method.speeds, 5 * single, rtol=1e-10, atol=0)  # held steps add nothing
    step()  # speeds were not restarted: the sum goes on
    torch.testing.assert_close(b.method.speeds, 6 * single, rtol=1e-10, atol=0)


# mmpareto -------------------------------------------------------------------------------------------------------
def authors_min_norm_weight(v1v1, v1v2, v2v2):
    """MMPareto's MinNormSolver._min_norm_element_from2 (GeWu-Lab/MMPareto_ICML2024), transcribed."""
    if v1v2 >= v1v1:
        return 0.999
    if v1v2 >= v2v2:
        return 0.001
    return -1.0 * ((v1v2 - v2v2) / (v1v1 + v2v2 - 2 * v1v2))


def authors_mmpareto(net, kw, rescale="tensor", gamma=1.5):
    """The authors' MMPareto.py step, transcribed for any number of encoders: per encoder the weights from the
    concatenated gradients, per tensor the rescale by the norm of the summed (fused + unimodal) gradient."""
    fused = kw["fused"].mean()
    total = fused + sum(v.mean() for v in kw["unimodal"].values())
    expected, conflicts = {}, 0
    for m in DIMS:
        params = list(net.enc[m].parameters())
        g_mm = autograd_grads(fused, params)
        g_m = autograd_grads(kw["unimodal"][m].mean(), params)
        g_three = autograd_grads(total, params)
        flat_mm = torch.cat([g.reshape(-1) for g in g_mm])
        flat_m = torch.cat([g.reshape(-1) for g in g_m])
        if F.cosine_similarity(flat_mm, flat_m, dim=0) > 0:
            k = (0.5, 0.5)
        else:
            conflicts += 1
            c = authors_min_norm_weight(float(flat_mm @ flat_mm), float(flat_mm @ flat_m), float(flat_m @ flat_m))
            k = (c, 1 - c)
        new = [2 * k[0] * a + 2 * k[1] * b for a, b in zip(g_mm, g_m)]
        if rescale == "tensor":
            out = []
            for g, three in zip(new, g_three):
                diff = three.norm() / g.norm()
                out.append(diff * g * gamma if diff > 1 else g * gamma)
        else:  # modfuse's per-encoder option: one factor from the norms over the whole encoder
            flat_new = torch.cat([g.reshape(-1) for g in new])
            diff = float((flat_mm + flat_m).norm() / flat_new.norm())
            out = [g * max(1.0, diff) * gamma for g in new]
        expected[m] = torch.cat([g.reshape(-1) for g in out])
    return expected, conflicts, autograd_grads(total, [net.head.weight])[0]


@pytest.mark.parametrize("rescale", ["tensor", "encoder"])
@pytest.mark.parametrize("seed", [2, 6])
def test_mmpareto_matches_the_authors_code(rescale, seed):
    net, xs, y = setup(seed)
    kw = losses(net, xs, y)
    expected, conflicts, plain_head = authors_mmpareto(net, kw, rescale)
    b = balancer_for(net, "mmpareto", **({} if rescale == "tensor" else {"rescale": rescale}))
    assert b.backward(**kw)
    for m in DIMS:
        close(torch.cat([p.grad.reshape(-1) for p in net.enc[m].parameters()]), expected[m])
    close(net.head.weight.grad, plain_head)
    assert b.stats()["conflicts"] == conflicts


def test_mmpareto_rescale_forms_differ_on_a_conflict():
    """Per tensor and per encoder give different steps when the gradients conflict (else both rescale by 1)."""
    for seed in range(20):
        net, xs, y = setup(seed)
        kw = losses(net, xs, y)
        per_tensor, conflicts, _ = authors_mmpareto(net, kw, "tensor")
        if conflicts:
            per_encoder, _, _ = authors_mmpareto(net, kw, "encoder")
            assert any(not torch.allclose(per_tensor[m], per_encoder[m]) for m in DIMS)
            return
    pytest.fail("no seed gave a conflicting step")


@pytest.mark.parametrize("zero", ["unimodal", "fused"])
@pytest.mark.parametrize("rescale", ["tensor", "encoder"])
def test_mmpareto_with_an_exactly_zero_gradient_stays_finite(zero, rescale):
    """A zero-initialised unimodal head (or a fused loss that does not depend on the encoders) gives an exactly
    zero gradient: the authors' solver clips the weight to 0.001/0.999, so .grad is 1.5 x the other gradient in
    float32 (the unclipped weight rescaled the zero vector by ~1e154 = inf in float32: NaN in .grad)."""
    torch.manual_seed(0)
    net = SharedHeadNet(DIMS)
    xs, y = batch(DIMS, seed=0)
    fused, uni = net(xs)
    if zero == "fused":
        fused = fused * 0  # exactly zero gradient on every encoder parameter, the graph still reaches them
    else:
        uni = {m: v * 0 for m, v in uni.items()}
    kw = {
        "fused": F.cross_entropy(fused, y, reduction="none"),
        "unimodal": {m: F.cross_entropy(v, y, reduction="none") for m, v in uni.items()},
    }
    other = kw["unimodal"] if zero == "fused" else None
    expected = {}
    for m in DIMS:
        params = list(net.enc[m].parameters())
        loss = other[m].mean() if other is not None else kw["fused"].mean()
        expected[m] = torch.cat([g.reshape(-1) for g in autograd_grads(loss, params)]) * 1.5
    b = balancer_for(net, "mmpareto", rescale=rescale)
    assert b.backward(**kw)
    for m in DIMS:
        got = torch.cat([p.grad.reshape(-1) for p in net.enc[m].parameters()])
        assert bool(torch.isfinite(got).all()), (m, got)
        torch.testing.assert_close(got, expected[m], rtol=1e-5, atol=1e-7)


# utilization ----------------------------------------------------------------------------------------------------
def test_utilization_penalty_matches_the_formula():
    net, xs, y = setup(3)
    kw = losses(net, xs, y)
    p = torch.softmax(kw["fused_logits"], 1)[torch.arange(len(y)), y]
    generator = torch.Generator().manual_seed(0)
    drops = []
    for m in DIMS:
        shuffled = dict(xs)
        shuffled[m] = xs[m][torch.randperm(len(y), generator=generator)]
        drops.append((p - torch.softmax(net(shuffled)[0], 1)[torch.arange(len(y)), y]).mean())
    drops = torch.stack(drops)
    mu = torch.relu(drops) / (torch.relu(drops).sum() + 1e-8)
    lam = 1e-3  # epoch 0: lambda_max / 1000
    loss = (
        kw["fused"].mean()
        + sum(v.mean() for v in kw["unimodal"].values())
        + lam * (mu - torch.tensor([0.75, 0.25], dtype=torch.float64)).square().sum()
    )
    expected = autograd_grads(loss, list(net.parameters()))
    b = balancer_for(net, "utilization", target=0.75, dominant="a")
    assert b.backward(**kw)
    for q, e in zip(net.parameters(), expected):
        close(q.grad, e, rtol=1e-6)  # the penalty is computed in float32 probabilities
    assert b.stats()["a/utilization"] == pytest.approx(mu[0].item(), rel=1e-5)


def test_utilization_lambda_schedule():
    net = SharedHeadNet(DIMS)
    b = balancer_for(net, "utilization", warmup_epochs=10)
    values = []
    for _ in range(21):
        values.append(b.method.lam())
        b.end_epoch()
    assert values[0] == pytest.approx(1e-3)
    assert values[5] == pytest.approx(10**-1.5)
    assert values[10] == values[20] == pytest.approx(1.0)
    assert all(x < y for x, y in zip(values[:10], values[1:11]))


# mimo, i2m2 -----------------------------------------------------------------------------------------------------
def test_mimo_objective():
    net, xs, y = setup(4)
    kw = losses(net, xs, y)
    L = torch.stack([kw["unimodal"][m].mean() for m in DIMS])
    loss = kw["fused"].mean() + 0.5 * 2.0 * torch.logsumexp(L / 2.0, 0)
    expected = autograd_grads(loss, list(net.parameters()))
    balancer_for(net, "mimo", lam=0.5, tau=2.0).backward(**kw)
    for q, e in zip(net.parameters(), expected):
        close(q.grad, e)


def test_i2m2_log_probs_and_gradients():
    net, xs, y = setup(5)
    kw = losses(net, xs, y)
    probs = torch.softmax(kw["fused_logits"], 1)
    for m in DIMS:
        probs = probs * torch.softmax(kw["logits"][m], 1)
    expected_log_p = torch.log(probs / probs.sum(1, keepdim=True))
    log_p = i2m2_log_probs([kw["logits"][m] for m in DIMS], kw["fused_logits"])
    close(log_p, expected_log_p)
    close(log_p.exp().sum(1), torch.ones(len(y), dtype=torch.float64))
    loss = F.nll_loss(log_p, y)
    expected = autograd_grads(loss, list(net.parameters()))
    balancer_for(net, "i2m2").backward(logits=kw["logits"], fused_logits=kw["fused_logits"], target=y)
    for q, e in zip(net.parameters(), expected):
        close(q.grad, e)


def test_registry_has_every_spec_method():
    assert modfuse.methods.names() == sorted(
        [
            "agm",
            "calibrated",
            "cggm",
            "greedy",
            "i2m2",
            "inforeg",
            "mimo",
            "mmpareto",
            "none",
            "ogm_ge",
            "pmr",
            "utilization",
        ]
    )
