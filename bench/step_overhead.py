"""Every method's training step beside the eager code it replaces, side by side in one run, printed as ratios
(issue 15). Writes bench/results/<date>-<device>-step-overhead[-small].{json,md} through bench/harness.py.

    python -m bench.step_overhead                  # the issue's model on the CPU (~10 min on 2 busy cores)
    python -m bench.step_overhead --small          # a toy model of the same shape, for quick runs and CI
    python -m bench.step_overhead --device cuda    # the same table on a GPU

Model (the issue's): two ResNet-18 encoders written out here (torchvision is not a dependency), "audio" on a
1-channel spectrogram-like input and "visual" on 3-channel frames, 11.2M parameters and 60 tensors each; a shared
head Linear(512, 512)-ReLU-Linear(512, classes) applied to each embedding (unimodal logits) and to their mean
(fused logits); batch 4, SGD. The input size does not change the parameter count (what the methods' own work
scales with), only the forward/backward cost; --size picks it. --rounds and --alone-steps trade time for noise.

One step = optimizer.zero_grad() (set_to_none=True, torch's default; --zero-grad zero keeps zeroed buffers),
forward, the method's gradients, SGD step (and a device sync). Competitors:
- plain loss.backward() of the fused loss (the floor) and modfuse "none";
- ogm_ge vs the official per-parameter loop (GeWu-Lab/OGM-GE_CVPR2022): backward, scores, then for every conv
  weight grad = grad * coeff + N(0, grad.std()^2) drawn per tensor;
- greedy vs a per-parameter norm loop and a torch._foreach_norm version of the same speed statistic
  s_m += ||g_m||^2 / ||theta_m||^2;
- mmpareto vs the structure of the authors' code (GeWu-Lab/MMPareto_ICML2024: one backward per loss with the
  gradients cloned, then a fourth backward of the summed loss, per-parameter rescale) and a lean eager form (3
  backwards through autograd.grad, the combination with torch._foreach ops);
- calibrated (per_sample) vs the same moments from BackPACK's SumGradSquared and from opacus' per-sample gradients,
  feeding the plain-PyTorch reference of Op 4 (modfuse.reference.calibrated_aggregate). Both libraries need the
  extended module to run once per backward, so these peers re-run the small head on the detached embeddings once per
  objective; the encoders get the plain gradient of the summed objective, as modfuse gives them.

Measures, per competitor, the median over rounds (after warm-up rounds; each round runs every competitor once, in
an order reversed every other round to cancel drift):
- step: the whole step's wall time;
- own work: the step minus the plain step (forward + fused-loss backward + SGD) of the same round (a paired
  difference, the same definition on both sides): what the method adds to a plain training step;
- step alone and fresh pages: afterwards each competitor runs alone in a fresh (spawned) process, --warmup steps
  then --alone-steps measured ones: its step time there and its minor page faults per step (resource.getrusage
  ru_minflt) x the page size, in MB. In its own process the allocator is in the steady state of a training loop
  that runs this method only; interleaved with eleven other competitors, the process's heap holds their freed
  memory and hides most first touches (the interleaved counts are kept in the JSON as fresh_MB_interleaved).
Ratios are peer / modfuse (> 1: modfuse is faster). Before timing, every peer's gradients (or statistic) are
checked against modfuse's on the same inputs and parameters (ogm_ge: the step without GE, the noise differing by
construction; then, on both sides, the GE noise's std per conv weight against that gradient's std; greedy: the
speeds); a mismatch aborts the run.
"""

from __future__ import annotations

import argparse
import copy
import multiprocessing
import resource
import statistics
import time
import warnings
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import modfuse
from bench.harness import RESULTS, environment, write
from modfuse import reference

PAGES_SLACK_MB = 1.0  # the allocator's own step-to-step noise in fresh pages, below which two counts tie
ALPHA, GAMMA = 0.8, 1.5  # OGM-GE's alpha (modfuse's default, the paper's CREMA-D value); MMPareto's gamma


# -- the model ------------------------------------------------------------------------------------------------
class BasicBlock(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + (x if self.down is None else self.down(x)))


class ResNet18(nn.Module):
    """ResNet-18 without its classifier: embedding of size 8 * width (512 at the standard width 64)."""

    def __init__(self, in_channels, width=64):
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, width, 7, 2, 3, bias=False), nn.BatchNorm2d(width), nn.ReLU(), nn.MaxPool2d(3, 2, 1)
        )
        blocks, cin = [], width
        for i, cout in enumerate([width, 2 * width, 4 * width, 8 * width]):
            blocks += [BasicBlock(cin, cout, 1 if i == 0 else 2), BasicBlock(cout, cout, 1)]
            cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.dim = cin

    def forward(self, x):
        return torch.flatten(F.adaptive_avg_pool2d(self.blocks(self.stem(x)), 1), 1)


class TwoResNets(nn.Module):
    """Late fusion of an audio and a visual ResNet-18 through a shared head (unimodal and fused logits)."""

    CHANNELS = {"audio": 1, "visual": 3}

    def __init__(self, width=64, classes=6):
        super().__init__()
        self.enc = nn.ModuleDict({m: ResNet18(c, width) for m, c in self.CHANNELS.items()})
        d = 8 * width
        self.head = nn.Sequential(nn.Linear(d, d), nn.ReLU(), nn.Linear(d, classes))

    def features(self, xs):
        return {m: self.enc[m](xs[m]) for m in self.enc}

    def forward(self, xs):
        hs = self.features(xs)
        return self.head(torch.stack(list(hs.values())).mean(0)), {m: self.head(h) for m, h in hs.items()}


class LateFusion(nn.Module):
    """Two MLP encoders and a shared Linear-ReLU-Linear head (bench/distributed.py's model)."""

    def __init__(self, dims, hidden, classes=10):
        super().__init__()
        self.enc = nn.ModuleDict(
            {
                m: nn.Sequential(nn.Linear(d, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU())
                for m, d in dims.items()
            }
        )
        self.head = nn.Sequential(nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, classes))

    def forward(self, xs):
        hs = {m: self.enc[m](xs[m]) for m in self.enc}
        return self.head(torch.stack(list(hs.values())).mean(0)), {m: self.head(h) for m, h in hs.items()}


def ce(logits, y, reduction="mean"):
    return F.cross_entropy(logits, y, reduction=reduction)


def encoder_params(net, m):
    return [p for p in net.enc[m].parameters() if p.requires_grad]


# -- the competitors: each computes the step's gradients into .grad from zeroed (None) gradients --------------
class Competitor:
    method = "none"  # the method this competitor belongs to
    modfuse = False

    def __init__(self, name, base, args):
        self.name, self.net = name, copy.deepcopy(base)
        self.optimizer = torch.optim.SGD(self.net.parameters(), lr=args.lr)
        self.set_to_none = getattr(args, "zero_grad", "none") == "none"

    def gradients(self, batch):
        raise NotImplementedError

    def step(self, batch):
        self.optimizer.zero_grad(set_to_none=self.set_to_none)
        self.gradients(batch)
        self.optimizer.step()

    def statistic(self):
        """What the correctness check compares besides the gradients (None: the gradients only)."""
        return None


class Plain(Competitor):
    def gradients(self, batch):
        xs, y = batch
        fused, _ = self.net(xs)
        ce(fused, y).backward()


class ModfuseCompetitor(Competitor):
    modfuse = True

    def __init__(self, name, base, args, method, unimodal=False, **options):
        super().__init__(name, base, args)
        self.method, self.unimodal = method, unimodal
        net = self.net
        self.balancer = modfuse.Balancer(net, encoders=dict(net.enc), shared=net.head, method=method, **options)

    def gradients(self, batch):
        xs, y = batch
        fused, uni = self.net(xs)
        kw = {"fused": ce(fused, y, "none"), "logits": uni, "target": y}
        if self.unimodal:
            kw["unimodal"] = {m: ce(v, y, "none") for m, v in uni.items()}
        if not self.balancer.backward(**kw):
            raise RuntimeError(f"{self.name}: the Balancer skipped the step")

    def statistic(self):
        if self.method == "greedy":  # the speeds this step added (window_steps=1e9: no window ever closes)
            return self.balancer.state_dict()["method_state"]["speeds"].clone()
        return None


class OGMOfficial(Competitor):
    """The official OGM-GE step, for M = 2 (audio, visual): backward of the fused loss, the per-sample score loop,
    the coefficients, then every conv weight's gradient scaled and given N(0, std^2) noise, one tensor at a time."""

    method = "ogm_ge"

    def __init__(self, name, base, args, ge=True):
        super().__init__(name, base, args)
        self.ge = ge

    def gradients(self, batch):
        xs, y = batch
        fused, uni = self.net(xs)
        ce(fused, y).backward()
        out_a, out_v = uni["audio"].detach(), uni["visual"].detach()
        score_a = sum(F.softmax(out_a, 1)[i][y[i]] for i in range(out_a.size(0)))
        score_v = sum(F.softmax(out_v, 1)[i][y[i]] for i in range(out_v.size(0)))
        ratio_v = score_v / score_a
        ratio_a = 1 / ratio_v
        if ratio_v > 1:
            coeff = {"visual": 1 - torch.tanh(ALPHA * torch.relu(ratio_v)), "audio": 1}
        else:
            coeff = {"audio": 1 - torch.tanh(ALPHA * torch.relu(ratio_a)), "visual": 1}
        for m in ("audio", "visual"):
            for p in encoder_params(self.net, m):
                if p.grad is not None and p.grad.dim() == 4:
                    if self.ge:
                        noise = torch.zeros_like(p.grad).normal_(0, p.grad.std().item() + 1e-8)
                        p.grad = p.grad * coeff[m] + noise
                    else:
                        p.grad = p.grad * coeff[m]


class GreedyPeer(Competitor):
    """Backward of the fused loss, then the learning speed s_m += ||g_m||^2 / ||theta_m||^2 of each encoder, by a
    loop over the parameters (foreach=False) or torch._foreach_norm (foreach=True)."""

    method = "greedy"

    def __init__(self, name, base, args, foreach):
        super().__init__(name, base, args)
        self.foreach = foreach
        self.speeds = None

    def gradients(self, batch):
        xs, y = batch
        fused, _ = self.net(xs)
        ce(fused, y).backward()
        speeds = []
        with torch.no_grad():
            for m in self.net.enc:
                params = [p for p in encoder_params(self.net, m) if p.grad is not None]
                grads = [p.grad for p in params]
                if self.foreach:
                    g2 = torch.stack(torch._foreach_norm(grads)).square().sum()
                    w2 = torch.stack(torch._foreach_norm(params)).square().sum()
                else:
                    g2 = sum(g.norm() ** 2 for g in grads)
                    w2 = sum(p.norm() ** 2 for p in params)
                speeds.append(g2 / w2)
        self.speeds = torch.stack(speeds)

    def statistic(self):
        return self.speeds


def min_norm_from2(v1v1, v1v2, v2v2):
    """The two-vector min-norm weight of the first vector (the MinNormSolver the authors use)."""
    if v1v2 >= v1v1:
        return 0.999
    if v1v2 >= v2v2:
        return 0.001
    return float(-1.0 * ((v1v2 - v2v2) / (v1v1 + v2v2 - 2 * v1v2)))


class MMParetoAuthors(Competitor):
    """The authors' structure: each loss backwarded on its own (retain_graph) with the encoders' gradients cloned
    per parameter and concatenated, the cosines from the concatenations, the min-norm weights from per-tensor dot
    products when they conflict, a fourth backward of the summed loss, then per encoder parameter
    g = 2 (k0 g_mm + k1 g_m), rescaled by max(1, ||total grad|| / ||g||) and gamma."""

    method = "mmpareto"

    def gradients(self, batch):
        xs, y = batch
        net = self.net
        fused, uni = net(xs)
        losses = {"both": ce(fused, y), **{m: ce(v, y) for m, v in uni.items()}}
        names = {m: [n for n, p in net.named_parameters() if n.startswith(f"enc.{m}.")] for m in net.enc}
        params = dict(net.named_parameters())
        grads = {m: {} for m in net.enc}
        for kind, loss in losses.items():
            loss.backward(retain_graph=True)
            for m in net.enc:
                if kind in ("both", m):
                    record = {n: params[n].grad.clone() for n in names[m]}
                    record["concat"] = torch.cat([record[n].flatten() for n in names[m]])
                    grads[m][kind] = record
            self.optimizer.zero_grad()
        k = {}
        for m in net.enc:
            both, own = grads[m]["both"], grads[m][m]
            if F.cosine_similarity(both["concat"], own["concat"], dim=0) > 0:
                k[m] = (0.5, 0.5)
            else:
                dots = [sum((a[n] * b[n]).sum() for n in names[m]) for a, b in ((both, both), (both, own), (own, own))]
                w = min_norm_from2(*[float(d) for d in dots])
                k[m] = (w, 1 - w)
        sum(losses.values()).backward()
        for m in net.enc:
            for n in names[m]:
                p = params[n]
                three_norm = torch.norm(p.grad)
                new_grad = 2 * k[m][0] * grads[m]["both"][n] + 2 * k[m][1] * grads[m][m][n]
                diff = three_norm / torch.norm(new_grad)
                p.grad = diff * new_grad * GAMMA if diff > 1 else new_grad * GAMMA


class MMParetoLean(Competitor):
    """The same math with three backwards (autograd.grad of each loss) and torch._foreach ops: the per-tensor dot
    products from ||x||^2, ||y||^2 and ||x + y||^2 (the rescale needs ||x + y|| anyway), ||g_t|| in closed form."""

    method = "mmpareto"

    def gradients(self, batch):
        xs, y = batch
        net = self.net
        fused, uni = net(xs)
        enc = {m: encoder_params(net, m) for m in net.enc}
        head = [p for p in net.parameters() if all(p is not q for ps in enc.values() for q in ps)]
        every = [p for ps in enc.values() for p in ps]
        g_fused = torch.autograd.grad(ce(fused, y), every + head, retain_graph=True)
        g_mm = dict(zip(map(id, every), g_fused))
        head_grad = list(g_fused[len(every) :])
        for i, m in enumerate(net.enc):
            g = torch.autograd.grad(ce(uni[m], y), enc[m] + head, retain_graph=i < len(net.enc) - 1)
            own, head_own = list(g[: len(enc[m])]), g[len(enc[m]) :]
            torch._foreach_add_(head_grad, head_own)
            both = [g_mm[id(p)] for p in enc[m]]
            total = torch._foreach_add(both, own)
            xx = torch.stack(torch._foreach_norm(both)).double().square()
            yy = torch.stack(torch._foreach_norm(own)).double().square()
            ss = torch.stack(torch._foreach_norm(total)).double().square()
            xy = (ss - xx - yy) / 2
            a, ab, b = xx.sum(), xy.sum(), yy.sum()
            if ab / torch.sqrt(a * b) > 0:
                w0 = 0.5
            else:
                w0 = min_norm_from2(float(a), float(ab), float(b))
            w1 = 1 - w0
            g_sq = (2 * w0) ** 2 * xx + 8 * w0 * w1 * xy + (2 * w1) ** 2 * yy
            factor = torch.where(g_sq > 0, torch.clamp(torch.sqrt(ss / g_sq), min=1), torch.ones_like(g_sq)) * GAMMA
            torch._foreach_mul_(both, 2 * w0)
            torch._foreach_add_(both, own, alpha=2 * w1)  # both now holds g (g_mm is not needed again)
            torch._foreach_mul_(both, factor.tolist())
            for p, gp in zip(enc[m], both):
                p.grad = gp
        for p, gp in zip(head, head_grad):
            p.grad = gp


def tied_head(head):
    """A copy of the head module whose layers hold the head's own Parameters (for the per-sample libraries' hooks)."""
    clone = copy.deepcopy(head)
    for a, b in zip(clone.modules(), head.modules()):
        if isinstance(a, nn.Linear):
            a.weight, a.bias = b.weight, b.bias
    return clone


class CalibratedPeer(Competitor):
    """S1 = sum_n W_n and S2 = sum_n W_n^2 of the head's per-sample gradients for each objective (audio, visual,
    fused), from BackPACK's SumGradSquared (S1 is the summed loss's gradient) or opacus' GradSampleModule, then the
    reference Op 4 into the head's .grad; the encoders get the plain gradient of the summed objective."""

    method = "calibrated"

    def __init__(self, name, base, args, library):
        super().__init__(name, base, args)
        self.library = library
        self.head_params = list(self.net.head.parameters())
        if library == "backpack":
            from backpack import extend
            from backpack.extensions import SumGradSquared

            self.stat_head, self.extension = extend(tied_head(self.net.head)), SumGradSquared
        else:
            from opacus import GradSampleModule

            self.stat_head = GradSampleModule(tied_head(self.net.head), batch_first=True, loss_reduction="sum")

    def moments(self, x, y):
        """S1, S2 of this objective's per-sample head gradients, flat [D]."""
        for p in self.head_params:
            p.grad = None
            p.grad_sample = None
        loss = ce(self.stat_head(x), y, "sum")
        with warnings.catch_warnings():  # the head's input is detached: the libraries' hooks say so, harmlessly
            warnings.filterwarnings("ignore", "Full backward hook is firing")
            if self.library == "backpack":
                from backpack import backpack

                with backpack(self.extension()):
                    loss.backward()
                s1 = [p.grad for p in self.head_params]
                s2 = [p.sum_grad_squared for p in self.head_params]
            else:
                loss.backward()
                s1 = [p.grad_sample.sum(0) for p in self.head_params]
                s2 = [p.grad_sample.square().sum(0) for p in self.head_params]
        return torch.cat([t.flatten() for t in s1]), torch.cat([t.flatten() for t in s2])

    def gradients(self, batch):
        xs, y = batch
        net = self.net
        hs = net.features(xs)
        fused_in = torch.stack(list(hs.values())).mean(0)
        fused = net.head(fused_in)
        total = ce(fused, y) + sum(ce(net.head(h), y) for h in hs.values())
        # the encoders' plain gradient of the objective (the head's own comes from Op 4)
        every = [p for m in net.enc for p in encoder_params(net, m)]
        torch.autograd.backward(total, inputs=every)
        rows = [self.moments(hs[m].detach(), y) for m in net.enc] + [self.moments(fused_in.detach(), y)]
        S1 = torch.stack([r[0] for r in rows])
        S2 = torch.stack([r[1] for r in rows])
        n = torch.full((len(rows),), float(y.shape[0]), dtype=S1.dtype, device=S1.device)
        out, _ = reference.calibrated_aggregate(S1, S2, n)
        start = 0
        for p in self.head_params:
            p.grad = out[start : start + p.numel()].view_as(p).to(p.dtype)
            p.grad_sample = None
            start += p.numel()


# (method, name, factory(name, base, args)); per method the modfuse competitor first, "none" first of all (its
# peer, plain, is the floor every own work is measured against)
SPECS = [
    ("none", "modfuse none", lambda n, b, a: ModfuseCompetitor(n, b, a, "none")),
    ("none", "plain loss.backward()", Plain),
    ("ogm_ge", "modfuse ogm_ge", lambda n, b, a: ModfuseCompetitor(n, b, a, "ogm_ge", alpha=ALPHA)),
    ("ogm_ge", "official per-parameter loop", OGMOfficial),
    ("greedy", "modfuse greedy", lambda n, b, a: ModfuseCompetitor(n, b, a, "greedy", window_steps=10**9)),
    ("greedy", "per-parameter norm loop", lambda n, b, a: GreedyPeer(n, b, a, foreach=False)),
    ("greedy", "torch._foreach_norm", lambda n, b, a: GreedyPeer(n, b, a, foreach=True)),
    ("mmpareto", "modfuse mmpareto", lambda n, b, a: ModfuseCompetitor(n, b, a, "mmpareto", True, gamma=GAMMA)),
    ("mmpareto", "authors' code (4 backwards)", MMParetoAuthors),
    ("mmpareto", "lean eager (3 backwards)", MMParetoLean),
    (
        "calibrated",
        "modfuse calibrated per_sample",
        lambda n, b, a: ModfuseCompetitor(n, b, a, "calibrated", True, moments="per_sample"),
    ),
    ("calibrated", "BackPACK SumGradSquared + reference Op 4", lambda n, b, a: CalibratedPeer(n, b, a, "backpack")),
    ("calibrated", "opacus per-sample + reference Op 4", lambda n, b, a: CalibratedPeer(n, b, a, "opacus")),
]


def competitors(base, args, only=None):
    """[(method, [modfuse competitor, peers...])] in table order (only: just the competitor of that name). A peer
    whose library is not installed is left out with a note."""
    table = []
    for method, name, factory in SPECS:
        if only is not None and name != only:
            continue
        try:
            c = factory(name, base, args)
        except ImportError as error:
            print(f"({name}: {error.name} is not installed, left out)", flush=True)
            continue
        if not table or table[-1][0] != method:
            table.append((method, []))
        table[-1][1].append(c)
    return table


def inputs(args, device):
    """The model (seed 0) and the one batch every step uses."""
    torch.manual_seed(0)
    base = TwoResNets(args.width).to(device)
    xs = {m: torch.randn(args.batch, c, args.size, args.size, device=device) for m, c in base.CHANNELS.items()}
    y = torch.randint(0, 6, (args.batch,), device=device)
    return base, (xs, y)


# -- correctness: every peer against modfuse on the same inputs and parameters ---------------------------------
def grads_of(c):
    return {n: p.grad.detach().clone() for n, p in c.net.named_parameters() if p.grad is not None}


def rel_err(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def compare_grads(ours, theirs, parts, tol):
    """Worst relative error over the parameter groups (each encoder, the head); ours and theirs: name -> grad."""
    if set(ours) != set(theirs):
        return float("inf")
    worst = 0.0
    for prefix in parts:
        names = [n for n in ours if n.startswith(prefix)]
        a = torch.cat([ours[n].flatten() for n in names])
        b = torch.cat([theirs[n].flatten() for n in names])
        worst = max(worst, rel_err(b, a))
    return worst


def check_noise(noisy, quiet, batch, base, args, tol=0.15):
    """OGM-GE's noise, both sides: (step with GE - the same step without GE) per conv weight has the std of that
    tensor's unscaled gradient (the plain fused-loss gradient). noisy, quiet: [modfuse, official] with and without GE
    (quiet ones already hold their gradients); tensors of >= 2000 elements, where a std estimate is within a few %."""
    plain = Plain("plain", base, args)
    plain.gradients(batch)
    expected = grads_of(plain)
    out = []
    for with_ge, without in zip(noisy, quiet):
        with_ge.optimizer.zero_grad(set_to_none=True)
        with_ge.gradients(batch)
        a, b = grads_of(with_ge), grads_of(without)
        ratios = [
            float((a[n] - b[n]).std() / expected[n].std())
            for n in a
            if n.startswith("enc.") and a[n].dim() == 4 and a[n].numel() >= 2000
        ]
        err = max(abs(r - 1) for r in ratios)
        ok = err <= tol
        name = f"{with_ge.name}: GE noise"
        what = "noise std / gradient std"
        out.append({"method": "ogm_ge", "peer": name, "compared": what, "max_rel_err": err, "ok": ok})
        print(f"check ogm_ge     {name:42s} {what}: {min(ratios):.3f}..{max(ratios):.3f} {'ok' if ok else 'MISMATCH'}")
        with_ge.optimizer.zero_grad(set_to_none=True)
    return out


def check(table, batch, base, args):
    """Gradients (or the speed statistic) of every peer against modfuse's, once, from the same state."""
    parts = [f"enc.{m}." for m in base.enc] + ["head."]
    tol = 1e-4
    results = []
    for method, group in table:
        ours = group[0]
        if method == "ogm_ge":  # the noise differs by construction: compare the GE-free step (OGM), same coefficients
            ours = ModfuseCompetitor("modfuse ogm_ge, ge=False", base, args, "ogm_ge", alpha=ALPHA, ge=False)
            peers = [OGMOfficial("official per-parameter loop, ge=False", base, args, ge=False)]
        else:
            peers = group[1:]
        for c in [ours, *peers]:
            c.optimizer.zero_grad(set_to_none=True)
            c.gradients(batch)
        reference_grads = grads_of(ours)
        if method == "ogm_ge":
            results += check_noise(group[:2], [ours, peers[0]], batch, base, args)
        for peer in peers:
            if method == "greedy":
                err = rel_err(peer.statistic().double(), ours.statistic().double())
                what = "speeds"
            else:
                err = compare_grads(reference_grads, grads_of(peer), parts, tol)
                what = "gradients"
            ok = err <= tol
            results.append({"method": method, "peer": peer.name, "compared": what, "max_rel_err": err, "ok": ok})
            print(f"check {method:10s} {peer.name:42s} {what:9s} max rel err {err:.2e} {'ok' if ok else 'MISMATCH'}")
        if method == "ogm_ge":
            ours.balancer.close()
        for c in group:
            c.optimizer.zero_grad(set_to_none=True)
    bad = [r for r in results if not r["ok"]]
    if bad:
        raise AssertionError(f"peers disagree with modfuse (a benchmark of a wrong peer is worthless): {bad}")
    return results


# -- timing -----------------------------------------------------------------------------------------------------
def timed_step(c, batch, device):
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    start = time.perf_counter()
    c.step(batch)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    return seconds, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults


def alone(args, name):
    """In a fresh process (spawned: a clean allocator, as in a training loop that runs this method only): warm-up
    steps, then the measured ones; [(ms, fresh MB)] per measured step."""
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    base, batch = inputs(args, device)
    ((_, (c,)),) = competitors(base, args, only=name)
    del base
    page = resource.getpagesize()
    steps = [timed_step(c, batch, device) for _ in range(args.warmup + args.alone_steps)][args.warmup :]
    return [(seconds * 1e3, minflt * page / 1e6) for seconds, minflt in steps]


def measure_alone(table, args):
    """Each competitor in its own process, one after the other: steady-state fresh pages and step time."""
    out = {}
    spawn = multiprocessing.get_context("spawn")
    for _, group in table:
        for c in group:
            with ProcessPoolExecutor(max_workers=1, mp_context=spawn) as pool:
                out[c.name] = pool.submit(alone, args, c.name).result()
            ms, mb = (statistics.median(x) for x in zip(*out[c.name]))
            print(f"alone: {c.name:42s} step {ms:8.1f} ms  fresh pages {mb:7.1f} MB", flush=True)
    return out


def measure(table, batch, args, device):
    everyone = [c for _, group in table for c in group]
    plain = next(c for c in everyone if isinstance(c, Plain))
    times = {c.name: [] for c in everyone}
    faults = {c.name: [] for c in everyone}
    own = {c.name: [] for c in everyone}
    page = resource.getpagesize()
    for r in range(args.warmup + args.rounds):
        order = everyone if r % 2 == 0 else everyone[::-1]
        this = {}
        for c in order:
            this[c.name] = timed_step(c, batch, device)
        label = "warm-up" if r < args.warmup else "round"
        print(f"{label} {r + 1}/{args.warmup + args.rounds}: plain step {this[plain.name][0] * 1e3:.1f} ms", flush=True)
        if r < args.warmup:
            continue
        for c in everyone:
            seconds, minflt = this[c.name]
            times[c.name].append(seconds * 1e3)
            own[c.name].append((seconds - this[plain.name][0]) * 1e3)
            faults[c.name].append(minflt * page / 1e6)
    lone = measure_alone(table, args) if args.alone_steps else {}
    rows = []
    for method, group in table:
        ours = group[0].name
        for c in group:
            row = {
                "method": method,
                "competitor": c.name,
                "modfuse": c.modfuse,
                "step_ms": statistics.median(times[c.name]),
                "own_ms": statistics.median(own[c.name]),
                "fresh_MB_interleaved": statistics.median(faults[c.name]),
                "steps_ms": times[c.name],
                "alone_ms": statistics.median(ms for ms, _ in lone[c.name]) if lone else None,
                "fresh_MB": statistics.median(mb for _, mb in lone[c.name]) if lone else None,
                "alone_steps": lone.get(c.name),
            }
            if not c.modfuse:
                mine = next(x for x in rows if x["competitor"] == ours)
                row["step_ratio"] = row["step_ms"] / mine["step_ms"]
                row["own_ratio"] = row["own_ms"] / mine["own_ms"] if mine["own_ms"] > 0 and method != "none" else None
                row["alone_ratio"] = row["alone_ms"] / mine["alone_ms"] if lone else None
            rows.append(row)
    return rows


def fmt_ratio(x):
    return "-" if x is None else f"{x:.2f}x"


def fmt(x, spec=".1f"):
    return "-" if x is None else format(x, spec)


def table_lines(rows):
    lines = [
        "| method | competitor | step ms | own work ms | step alone ms | fresh pages MB/step (alone) "
        "| step: peer/modfuse | own work: peer/modfuse | step alone: peer/modfuse |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        name = f"**{r['competitor']}**" if r["modfuse"] else r["competitor"]
        lines.append(
            f"| {r['method']} | {name} | {r['step_ms']:.1f} | {r['own_ms']:.1f} | {fmt(r['alone_ms'])} | "
            f"{fmt(r['fresh_MB'])} | {fmt_ratio(r.get('step_ratio'))} | {fmt_ratio(r.get('own_ratio'))} | "
            f"{fmt_ratio(r.get('alone_ratio'))} |"
        )
    return lines


def goals(rows):
    """Issue 15's goals on every (method, peer) pair: own work >= 2x faster, whole step never slower, and for ogm_ge
    and greedy no more fresh-page traffic than the peer."""
    out = []
    for r in rows:
        if r["modfuse"] or r["method"] == "none":
            continue
        mine = next(x for x in rows if x["method"] == r["method"] and x["modfuse"])
        own = r["own_ratio"]
        goal = {
            "method": r["method"],
            "peer": r["competitor"],
            # None: modfuse's own work measured <= 0 (within the noise), no ratio
            "own work >= 2x": None if own is None else own >= 2,
            "step >= 1x": r["step_ratio"] >= 1,
        }
        if r["method"] in ("ogm_ge", "greedy") and r["fresh_MB"] is not None:
            goal["fresh pages <= peer"] = mine["fresh_MB"] <= r["fresh_MB"] + PAGES_SLACK_MB
        out.append(goal)
    return out


def goal_lines(rows, results):
    lines = ["| method | peer | own work >= 2x faster | whole step never slower | fresh pages <= peer's |"]
    lines.append("|---|---|---|---|---|")
    for g in results:
        r = next(x for x in rows if x["competitor"] == g["peer"])
        mine = next(x for x in rows if x["method"] == g["method"] and x["modfuse"])

        def mark(ok, figure):
            if ok is None:
                return "n/a (modfuse's own work <= 0: within the noise)"
            return f"{'met' if ok else 'MISSED'} ({figure})"

        pages = "-"
        if "fresh pages <= peer" in g:
            pages = mark(g["fresh pages <= peer"], f"{mine['fresh_MB']:.1f} vs {r['fresh_MB']:.1f} MB")
        lines.append(
            f"| {g['method']} | {g['peer']} | {mark(g['own work >= 2x'], fmt_ratio(r['own_ratio']))} | "
            f"{mark(g['step >= 1x'], fmt_ratio(r['step_ratio']))} | {pages} |"
        )
    return lines


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--small", action="store_true", help="toy model (ResNet-18 shape at width 4, 16x16 inputs)")
    parser.add_argument("--width", type=int, default=64, help="ResNet width (64: ResNet-18, 11.2M parameters)")
    parser.add_argument("--size", type=int, default=64, help="input height and width")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds (each runs every competitor once)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed rounds first")
    parser.add_argument(
        "--alone-steps",
        type=int,
        default=3,
        help="steps of each competitor alone in a fresh process after --warmup steps, for its fresh pages (0: skip)",
    )
    parser.add_argument(
        "--zero-grad",
        choices=["none", "zero"],
        default="none",
        help="each step starts with optimizer.zero_grad(set_to_none=True) (none, torch's default) or zeroed .grad",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if args.small:
        args.width, args.size = 4, 16
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    env = environment(device)
    base, batch = inputs(args, device)
    enc_params = {m: sum(p.numel() for p in base.enc[m].parameters()) for m in base.enc}
    enc_tensors = {m: len(list(base.enc[m].parameters())) for m in base.enc}
    sizes = ", ".join(f"{m} {enc_params[m] / 1e6:.2f}M parameters in {enc_tensors[m]} tensors" for m in base.enc)
    setup = (
        f"two ResNet-18 encoders at width {args.width} ({sizes}), inputs {args.size}x{args.size}, shared head "
        f"Linear({8 * args.width}, {8 * args.width})-ReLU-Linear(6), batch {args.batch}, SGD, "
        f"zero_grad(set_to_none={args.zero_grad == 'none'})"
    )
    print(
        f"step overhead | {env['device']} | torch {torch.__version__} | {env['threads']} threads\n{setup}\n"
        "ratios: peer / modfuse (> 1: modfuse is faster)\n",
        flush=True,
    )
    table = competitors(base, args)
    checks = check(table, batch, base, args)
    rows = measure(table, batch, args, device)
    lines = table_lines(rows)
    reached = goals(rows)
    targets = goal_lines(rows, reached)
    print("\n" + "\n".join(lines) + "\n\nissue 15's goals:\n" + "\n".join(targets), flush=True)
    markdown = [
        f"# modfuse step overhead: each method beside its eager peers, {env['date']}",
        "",
        f"{env['device']}, {env['threads']} threads, torch {env['torch']}, modfuse {env['modfuse']}. {setup}. "
        f"Median of {args.rounds} rounds after {args.warmup} warm-up rounds; every round runs every competitor once, "
        "in an order reversed every other round.",
        "",
        "step: forward + the method's gradients + SGD step. own work: the step minus the plain step "
        "(forward + fused-loss backward + SGD) of the same round. step alone, fresh pages: each competitor alone in "
        f"a fresh process, median of {args.alone_steps} steps after {args.warmup}: its step time and minor page "
        "faults per step x page size (the steady state of a loop that runs this method only). Ratios peer / "
        f"modfuse: > 1 means modfuse is faster. Bold: modfuse. Fresh pages tie within {PAGES_SLACK_MB} MB.",
        "",
        *lines,
        "",
        "## Goals (issue 15)",
        "",
        *targets,
        "",
        "Correctness checks before timing (max relative error of the peer against modfuse over each encoder and the "
        "head; GE noise: max |noise std / gradient std - 1| over the conv weights of >= 2000 elements):",
        "",
        *[f"- {c['method']}: {c['peer']}: {c['compared']} {c['max_rel_err']:.1e}" for c in checks],
    ]
    env["setup"] = {k: v for k, v in vars(args).items() if k != "out"}
    env["checks"] = checks
    env["goals"] = reached
    return write(args.out, env, rows, markdown, suffix="-step-overhead" + ("-small" if args.small else ""))


if __name__ == "__main__":
    main()
