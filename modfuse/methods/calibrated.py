"""Method "calibrated": uncertainty-calibrated aggregation of the objectives' gradients on shared parameters.

Source: docs/math.md, Op 4 (the gradient calibration of the seed papers: per-modality gradient uncertainty, evidence
from precision, reduced Dempster-Shafer fusion, uncertainty-weighted aggregation).

For every shared parameter element d and objective r (each modality's objective, then the fused one):
    mu_r = mean gradient over samples, v_r = sample variance, t2_r = n mu_r^2 / (v_r + eps),
    e_r = clamp(t2_r - 1, 0, evidence_max), b_r = e_r / (e_r + kappa),
    grad_d = sum_r b_r mu_r            (positive-part James-Stein shrinkage of every objective's mean gradient)
Elements whose per-objective gradients are noise (t2 ~ 1) get a shrunken update; consistent ones keep theirs.
Encoders and every other parameter get the plain gradient of the objective (fused + unimodal losses).

The samples, chosen by `moments`:
- "microbatch" (default): the batch is cut into K = `microbatches` contiguous parts and each objective is
  backpropagated once per part into the shared parameters (R * K small backwards); sample k is
  (K / N) * grad sum_{i in part k} loss_i, so the mean of the K samples is exactly the gradient of the mean loss.
  Cost: R * K backwards restricted to the shared parameters.
- "per_sample": every shared parameter must belong to an nn.Linear; forward hooks keep each call's input and
  output, one backward per objective gives the output gradients, and `linear_moments` forms S1 = sum_n W_n and
  S2 = sum_n W_n^2 from them without storing per-sample gradients (several calls of the same layer on one
  objective's path are the T axis). The losses are summed (not averaged) for that backward, so gy are
  per-sample gradients, and mu = S1 / N is the mean-loss gradient again. Needs per-sample losses.

Under torch.distributed, S1, S2 and n are summed over ranks (with the other gradients, in one packed collective)
before Op 4, so every rank computes the update of the global batch: the per-sample route gives exactly one process
on the concatenated batch; with micro-batches each rank cuts its own batch into K parts (world * K samples), each
scaled by K_total / N_total so that their mean is the gradient of the mean loss over all ranks' samples. An
objective missing on a rank (a modality absent there) adds zeros with count 0 on that rank.
Under FSDP2 both routes run shard-local (see _fsdp_finish): the micro-batch backwards differentiate w.r.t. FSDP2's
unsharded parameters (read by a pre-forward hook), and no partial backward reshards them (see
_unsharded_across_backwards), so they cost no collective.
Options: moments, microbatches (8; K = 4 gives weak evidence), kappa (1), eps (None: 1e-20 float32,
1e-30 float64), evidence_max (1e6), include_fused (True: the fused objective is one of the rows), compile
(False: run the statistics stage through torch.compile(fullgraph=True)), collectives ("reduce_scatter": under
torch.distributed each rank runs Op 4 on its 1/W slice of the summed banks and one all-gather returns the result,
(W-1)/W (2R + 1) D elements per rank against 2 (W-1)/W 2R D for "all_reduce" of the banks), evidence ("t": the
per-element t-statistic above; "precision": the BOGC-MML paper's reading, one evidence per objective from the
precision of its mean gradient relative to the objectives' mean precision, in plain PyTorch:
reference.calibrated_aggregate_precision, docs/math.md#calibrated; it rebalances towards steadier objectives and
all-reduces the banks whole under a process group or DDP; under FSDP2 it runs shard-local like the t route, its
one whole-bank quantity, the mean variance of each row, being a sum over elements that the route's one tiny
all-reduce carries; that path is always eager: compile=True does not apply there).
"""

from __future__ import annotations

import contextlib
import weakref

import torch

from modfuse import _checks as check
from modfuse import ops, reference
from modfuse.banks import MomentBank
from modfuse.methods import Method, register


def calibrate(
    S1: torch.Tensor, S2: torch.Tensor, n: torch.Tensor, kappa: float, eps: float, evidence_max: float, out=None
):
    """Op 4 through the public op, so the backend choice and its argument checks apply here too; the result is
    written into `out` (a persistent buffer) when given."""
    return ops.calibrated_aggregate(S1, S2, n, kappa, eps, evidence_max, out=out)


def calibrate_precision(S1, S2, n, kappa: float, eps: float, evidence_max: float, out=None):
    """evidence="precision": one evidence per objective from its gradient precision (plain PyTorch; no kernel,
    as it did not beat the t-statistic form on the trainer's data: README, calibrated)."""
    result, stats = reference.calibrated_aggregate_precision(S1, S2, n, kappa, eps, evidence_max)
    return (result, stats) if out is None else (out.copy_(result), stats)


@register
class Calibrated(Method):
    name = "calibrated"
    requires = ()
    plain_gradients = False
    fsdp2 = True  # both routes: shard-local Op 4 (see _fsdp_finish)

    def __init__(
        self,
        groups,
        moments: str = "microbatch",
        microbatches: int = 8,
        kappa: float = 1.0,
        eps: float | None = None,
        evidence_max: float = 1e6,
        include_fused: bool = True,
        compile: bool = False,
        collectives: str = "reduce_scatter",
        evidence: str = "t",
    ):
        super().__init__(groups)
        if evidence not in ("t", "precision"):
            raise ValueError(f"evidence must be 't' (per-element t-statistic) or 'precision', got {evidence!r}")
        self.evidence = evidence
        if moments not in ("microbatch", "per_sample"):
            raise ValueError(f"moments must be 'microbatch' or 'per_sample', got {moments!r}")
        if isinstance(microbatches, bool) or not isinstance(microbatches, int) or microbatches < 2:
            raise ValueError(f"microbatches must be an int >= 2 (a variance needs two samples), got {microbatches!r}")
        if not groups.shared:
            raise ValueError(
                "method 'calibrated' needs shared= parameters (those every modality's objective "
                "reaches, e.g. a head applied to each embedding)"
            )
        if not isinstance(include_fused, bool):
            raise TypeError(f"include_fused must be True or False, got {include_fused!r}")
        if collectives not in ("reduce_scatter", "all_reduce"):
            raise ValueError(f"collectives must be 'reduce_scatter' or 'all_reduce', got {collectives!r}")
        self.collectives = collectives
        self.moments, self.K, self.include_fused = moments, microbatches, include_fused
        self.kappa = check.positive("kappa", kappa)
        self.evidence_max = check.positive("evidence_max", evidence_max, allow_inf=True)
        self.eps = None if eps is None else check.positive("eps", eps)
        self.layouts = groups.layouts(groups.shared)
        # looked up at call time when not compiled, so a wrapper such as modfuse.train.timing.op_timer sees it
        op4 = calibrate if evidence == "t" else calibrate_precision
        self._compiled = torch.compile(op4, fullgraph=True, dynamic=False) if compile else None
        self._last: list[tuple[list[str], torch.Tensor]] = []
        self._calls: dict[torch.nn.Linear, list] = {}
        self._hooks: list = []
        if moments == "per_sample":
            self._linear = self._find_linears()
            # The hooks hold the method only weakly (a discarded Balancer stops recording and is collected), keep
            # only the calls of the current forward of the model (a new forward drops the previous one's), and
            # are removed by close() or when the method is collected.
            me = weakref.ref(self)
            self._hooks.append(groups.model.register_forward_pre_hook(lambda *_: _forget(me)))
            for module in self._linear:
                self._hooks.append(module.register_forward_hook(lambda mod, args, out: _record(me, mod, args, out)))
            self._finalizer = weakref.finalize(self, _remove, list(self._hooks))
        self._unsharded: dict[int, torch.Tensor] = {}  # FSDP2: id(sharded shared param) -> its unsharded tensor
        if moments == "microbatch" and groups.fsdp:
            # the micro-batch backwards differentiate w.r.t. the tensors the forward used: FSDP2's unsharded
            # parameters, which it sets on the owning modules before their forward (read by a pre-hook)
            me = weakref.ref(self)
            shared = {id(p) for _, p in groups.shared}
            for module in groups.model.modules():
                names = [(n, id(p)) for n, p in module._parameters.items() if p is not None and id(p) in shared]
                if names:
                    self._hooks.append(
                        module.register_forward_pre_hook(lambda mod, _, names=names: _record_unsharded(me, mod, names))
                    )
            self._finalizer = weakref.finalize(self, _remove, list(self._hooks))

    def _op4(self, *args, **kwargs):
        # the module-level function looked up per call, so a wrapper such as op_timer sees it
        return (calibrate if self.evidence == "t" else calibrate_precision)(*args, **kwargs)

    def close(self):
        _remove(self._hooks)
        self._calls = {}

    # -- gradients --------------------------------------------------------------------------------------------
    def check(self, step):
        rows = step.objectives() if self.include_fused else list(step.unimodal.items())
        if len(rows) < 1:
            raise ValueError("method 'calibrated' needs unimodal= losses (and/or fused= with include_fused=True)")
        missing = [m for m in self.groups.modalities if m not in step.unimodal]
        if self.groups.fsdp and missing:
            # each objective's backward fires FSDP2's hooks (collectives): every rank must run the same ones
            raise ValueError(
                f"method 'calibrated' under FSDP2 needs unimodal= losses for every modality on every "
                f"rank; missing: {', '.join(map(repr, missing))}"
            )
        for name, loss in rows:
            if loss.dim() != 1:
                raise ValueError(
                    f"method 'calibrated' needs per-sample losses (reduction='none'), but the {name} "
                    f"loss has shape {tuple(loss.shape)}"
                )
        N = rows[0][1].shape[0]
        if any(loss.shape[0] != N for _, loss in rows):
            raise ValueError("the per-sample losses must all have the same length N (one batch)")
        if self.moments == "microbatch" and N < self.K:
            raise ValueError(f"a batch of N = {N} samples cannot be cut into microbatches = {self.K} parts")
        if self.moments == "microbatch" and self.groups.fsdp and not self._unsharded:
            raise ValueError(
                "moments='microbatch' under FSDP2 saw no forward of the shared parameters' modules: build the "
                "Balancer before the forward pass (it reads FSDP2's unsharded parameters there)"
            )
        if self.moments == "per_sample" and not any(self._calls.values()):
            raise ValueError(
                "moments='per_sample' saw no forward call of the shared nn.Linear layers since the last "
                "step: build the Balancer before the forward pass and run the forward with autograd enabled"
            )

    def backward(self, step, total):
        groups = self.groups
        # The bank rows are the objectives present on any rank (agreed by the Balancer); absent here: zeros, n = 0.
        local = dict(step.objectives() if self.include_fused else step.unimodal.items())
        names = [
            m
            for m in groups.modalities + ["fused"]
            if step.row_ranks.get(m, int(m in local)) > 0 and (m != "fused" or self.include_fused)
        ]
        rows = [(name, local.get(name)) for name in names]
        N = next(loss.shape[0] for loss in local.values())
        banks = [MomentBank(layout, len(rows), self._zeroed) for layout in self.layouts]
        reached: set[int] = set()
        with self._unsharded_across_backwards():
            if self.moments == "microbatch":
                self._microbatch_moments(rows, N, banks, reached, step)
            else:
                self._per_sample_moments(rows, N, banks, reached)
        shared = {id(p) for _, p in groups.shared}
        others = [p for p in groups.trainable if id(p) not in shared]
        if groups.fsdp:
            self._fsdp_finish(step, names, N, banks, reached, total)
            return
        if others:
            groups.backward(total, others)
        flags = [
            torch.tensor(
                [float(id(p) in reached) for p in bank.layout.params], dtype=bank.S1.dtype, device=bank.S1.device
            )
            for bank in banks
        ]
        pairs, flats, others_reached = groups.grads_to_reduce(others)
        scatter = (
            self.evidence == "t"  # the precision evidence is a mean over the whole bank, not per slice
            and self.collectives == "reduce_scatter"
            and groups.distributed
            and groups.synced
            and len(banks) == 1
            and all(f.dtype == banks[0].S1.dtype for f in flats)
        )
        self._last = []
        if scatter:
            # Shard-local Op 4: each rank calibrates its 1/W slice of the summed banks; one all-gather returns
            # the whole gradient (and the others' gradients, packed in the same two collectives).
            bank = banks[0]
            R = len(rows)
            bank.n.copy_(torch.tensor([self._count(step, name, N) for name in names], dtype=bank.n.dtype))
            extra = torch.cat([*flats, *flags, *([] if others_reached is None else [others_reached])])
            eps = reference.default_eps(bank.S1.dtype) if self.eps is None else self.eps

            def op4(slice_, real):
                # into a persistent scratch buffer: scatter_apply_gather copies it into its all-gather payload
                out = self.groups.buffer(
                    ("calibrated", "slice_out"), (slice_.shape[1],), slice_.dtype, slice_.device, scratch=True
                )
                _, stats = (self._compiled or self._op4)(
                    slice_[:R].contiguous(),
                    slice_[R:].contiguous(),
                    bank.n,
                    self.kappa,
                    eps,
                    self.evidence_max,
                    out=out,
                )
                Dw = slice_.shape[1]
                # per-slice sums; padding elements have zero belief and zero evidence
                sums = torch.stack([stats[:, 0], stats[:, 1], stats[:, 2] * Dw, stats[:, 3] * Dw - (Dw - real)], 1)
                return out, sums

            out, sums, extra = groups.scatter_apply_gather(
                torch.cat([bank.S1, bank.S2]), op4, extra, extra_weighted=sum(f.numel() for f in flats)
            )
            start = 0
            for flat in flats:
                flat.copy_(extra[start : start + flat.numel()])
                start += flat.numel()
            flags = [extra[start : start + flags[0].numel()]]
            start += flags[0].numel()
            if others_reached is not None:
                others_reached = extra[start : start + others_reached.numel()]
            groups.finish_grads(pairs, others_reached)
            D = bank.layout.numel
            stats = sums.view(R, 4).clone()
            stats[:, 2:] /= D
            # the gathered result is a new tensor (groups.scatter_apply_gather): its own views, not cached ones
            results = [(bank, bank.layout.views(out.to(bank.layout.dtype)), stats)]
        else:
            # one packed all-reduce: the moment banks (sums), the reached flags and the other parameters' gradients
            groups.all_reduce_(
                weighted=flats,
                summed=[t for bank in banks for t in (bank.S1, bank.S2, bank.n)]
                + flags
                + ([] if others_reached is None else [others_reached]),
            )
            groups.finish_grads(pairs, others_reached)
            results = None
        for bank, flag in zip(banks, flags):
            for p, f in zip(bank.layout.params, flag.tolist()):
                if f == 0:
                    raise ValueError(
                        f"shared parameter {groups.name_of(p)!r} received no gradient from any objective of this step"
                    )
        if results is None:
            results = []
            for bank in banks:
                eps = reference.default_eps(bank.S1.dtype) if self.eps is None else self.eps
                grad = self._grad_buffer(bank.layout)
                # Op 4 writes straight into the persistent buffer the `.grad` view; for float16/bfloat16
                # parameters (float32 banks) it writes a float32 scratch row that is converted into it
                direct = grad.dtype == bank.S1.dtype
                out = grad if direct else self._scratch(bank.layout, "op4", bank.S1.dtype)
                _, stats = (self._compiled or self._op4)(
                    bank.S1, bank.S2, bank.n, self.kappa, eps, self.evidence_max, out=out
                )
                if not direct:
                    grad.copy_(out)
                results.append((bank, self.groups.views(bank.layout, grad), stats))
        for bank, views, stats in results:
            for p, view in zip(bank.layout.params, views):
                p.grad = view
            self._last.append((names, stats))

    def _fsdp_finish(self, step, names, N, banks, reached, total):
        """FSDP2, shard-local Op 4: one plain backward through FSDP2 (encoders and every other parameter get their
        gradient shards from its reduce-scatter), then the moment banks are reduce-scattered onto the ranks' own
        shards of the shared parameters, Op 4 runs on that slice, and the result overwrites this rank's shard of
        their `.grad`. No all-gather; one tiny all-reduce of Op 4's per-objective sums for stats()."""
        groups = self.groups
        groups.backward(total, groups.trainable)
        self._last = []
        R = len(names)
        for bank in banks:
            bank.n.copy_(torch.tensor([self._count(step, name, N) for name in names], dtype=bank.n.dtype))
            flags = torch.tensor(
                [float(id(p) in reached) for p in bank.layout.params], dtype=bank.S1.dtype, device=bank.S1.device
            )
            mine, where, flags = groups.reduce_scatter_to_shards(bank.layout, torch.cat([bank.S1, bank.S2]), flags)
            for p, f in zip(bank.layout.params, flags.tolist()):
                if f == 0:
                    raise ValueError(
                        f"shared parameter {groups.name_of(p)!r} received no gradient from any objective of this step"
                    )
            eps = reference.default_eps(bank.S1.dtype) if self.eps is None else self.eps
            if self.evidence == "precision":
                out, sums = self._precision_shard(mine[:R], mine[R:], bank.n, eps, bank.layout.numel)
            else:
                out, stats = (self._compiled or self._op4)(
                    mine[:R].contiguous(), mine[R:].contiguous(), bank.n, self.kappa, eps, self.evidence_max
                )
                L = mine.shape[1]
                real = sum(numel for _, _, numel in where)
                # sums over this rank's slice (padding has zero belief and zero evidence), then over ranks
                sums = torch.stack([stats[:, 0], stats[:, 1], stats[:, 2] * L, stats[:, 3] * L - (L - real)], 1)
                groups.all_reduce_(summed=[sums])
                sums[:, 2:] /= bank.layout.numel
            out = out.to(bank.layout.dtype)
            with torch.no_grad():
                for p, start, numel in where:
                    local = p.grad.to_local()
                    local.copy_(out[start : start + numel].view_as(local))
            self._last.append((names, sums))

    def _precision_shard(self, S1, S2, n, eps, D):
        """FSDP2, evidence="precision" on this rank's slice [R, L] of the summed banks: the one whole-bank quantity,
        mean_d v_rd / n_r, is a sum over elements, so its shard-local partial sums go over ranks in one tiny float64
        all-reduce with sum_d mu^2 (for stats()); then the per-row evidence and belief are those of
        reference.calibrated_aggregate_precision and Op 4's sum over rows runs on the slice. Padding elements (zero
        sums) add nothing. Returns (out [L], stats [R, 4] in the layout of the t route: sums, then means over D)."""
        n = n.reshape(-1, 1)
        mu = S1 / n
        v = torch.clamp(S2 - n * mu.square(), min=0) / (n - 1)
        partial = torch.stack([(v / n).sum(1), mu.square().sum(1)], 1).double()
        self.groups.all_reduce_(summed=[partial])
        precision = 1 / (partial[:, 0] / D + eps)
        e = torch.clamp(precision.numel() * precision / precision.sum(), max=self.evidence_max)
        b = e / (e + self.kappa)
        out = (b.to(mu.dtype).reshape(-1, 1) * mu).sum(0)
        return out, torch.stack([partial[:, 1], b.square() * partial[:, 1], b, (e == 0).double()], 1)

    @contextlib.contextmanager
    def _unsharded_across_backwards(self):
        """FSDP2: the partial backwards (per objective, or per objective and micro-batch) must not reshard the
        parameters after each of them, or the next one's pre-backward hook would all-gather them again (R or R*K
        all-gathers of the shared group per step). FSDP2's set_reshard_after_backward(False) keeps them
        unsharded, as its gradient accumulation does; the setting is restored before the step's real backward,
        which then finds them unsharded and reshards them at its end as usual."""
        if not self.groups.fsdp:
            yield
            return
        from torch.distributed.fsdp import FSDPModule

        modules = [m for m in self.groups.model.modules() if isinstance(m, FSDPModule)]
        # the setter is public; the current value is read where the setter writes it (private: a list
        # `_fsdp_param_groups` in recent torch, one `_fsdp_param_group` in older releases)
        before = [[g.reshard_after_backward for g in _param_groups(m)] for m in modules]
        for m in modules:
            m.set_reshard_after_backward(False, recurse=False)
        try:
            yield
        finally:
            for m, values in zip(modules, before):
                for g, value in zip(_param_groups(m), values):
                    g.reshard_after_backward = value

    def _grad_buffer(self, layout):
        """The persistent flat buffer Op 4 writes the shared parameters' gradient into; their `.grad` are views of it
        (not scratch: a later call must not reuse it while those views hold the gradient, see Groups.hold)."""
        return self.groups.buffer(("calibrated", "grad", id(layout)), (layout.numel,), layout.dtype, layout.device)

    def _scratch(self, layout, purpose, dtype):
        return self.groups.buffer(
            ("calibrated", purpose, id(layout)), (layout.numel,), dtype, layout.device, scratch=True
        )

    def _zeroed(self, purpose, shape, dtype, device):
        """Zeroed moment banks, persistent across steps (Groups.buffer)."""
        return self.groups.buffer(("calibrated", purpose), shape, dtype, device, zero=True)

    def _count(self, step, name, N):
        """n of a bank row over all ranks: samples (per_sample) or micro-batches (K per rank that has the row)."""
        if self.moments == "per_sample":
            return step.row_samples.get(name, N)
        return self.K * step.row_ranks.get(name, 1)

    def _microbatch_moments(self, rows, N, banks, reached, step):
        params = [p for layout in self.layouts for p in layout.params]
        if self.groups.fsdp:  # the unsharded tensors of this forward: full-size local gradients, as without FSDP2
            params = [self._unsharded.get(id(p), p) for p in params]
        bounds = torch.linspace(0, N, self.K + 1).round().long().tolist()
        scratch = [
            self.groups.buffer(("calibrated", id(layout)), (layout.numel,), layout.dtype, layout.device, scratch=True)
            for layout in self.layouts
        ]
        for r, (name, loss) in enumerate(rows):
            if loss is None:
                continue
            # K parts per rank: scale = (parts over all ranks) / (samples over all ranks), K / N in one process
            scale = self.K * step.row_ranks.get(name, 1) / step.row_samples.get(name, N)
            for k in range(self.K):
                part = loss[bounds[k] : bounds[k + 1]].sum() * scale
                grads = self.groups.grads(part, params)
                i = 0
                for layout, bank, flat in zip(self.layouts, banks, scratch):
                    g = grads[i : i + len(layout.params)]
                    i += len(layout.params)
                    reached.update(id(p) for p, gp in zip(layout.params, g) if gp is not None)
                    layout.flatten_into(flat, g)
                    ops.moments_accumulate_(bank.S1[r], bank.S2[r], flat)
            for bank in banks:
                bank.n[r] = self.K

    # -- per-sample moments of nn.Linear layers (Op 3) --------------------------------------------------------
    def _find_linears(self) -> list[torch.nn.Linear]:
        owner = {}
        for module in self.groups.model.modules():
            if isinstance(module, torch.nn.Linear):
                for p in module.parameters(recurse=False):
                    owner[id(p)] = module
        linears = []
        for name, p in self.groups.shared:
            if id(p) not in owner:
                raise ValueError(
                    f"moments='per_sample' needs every shared parameter to be the weight or bias of an "
                    f"nn.Linear; {name!r} is not (use moments='microbatch')"
                )
            if owner[id(p)] not in linears:
                linears.append(owner[id(p)])
        # the parameters as registered now: under FSDP2 `module.weight` is swapped for an unsharded tensor
        # around each forward, while the groups hold the sharded ones
        self._weights = {m: (m.weight, m.bias) for m in linears}
        return linears

    def _per_sample_moments(self, rows, N, banks, reached):
        calls = [(m, x, y) for m, cs in self._calls.items() for x, y in cs]
        self._calls = {}
        where = {id(p): (bank, j) for bank in banks for j, p in enumerate(bank.layout.params)}
        for r, (_, loss) in enumerate(rows):
            if loss is None:
                continue
            gys = torch.autograd.grad(loss.sum(), [y for _, _, y in calls], retain_graph=True, allow_unused=True)
            per_module: dict[torch.nn.Linear, list] = {}
            for (module, x, _), gy in zip(calls, gys):
                if gy is not None:
                    if x.shape[0] != N:
                        raise ValueError(
                            f"moments='per_sample': a shared nn.Linear saw a batch of {x.shape[0]} "
                            f"rows but the losses have N = {N} samples"
                        )
                    per_module.setdefault(module, []).append(
                        (x.reshape(N, -1, x.shape[-1]), gy.reshape(N, -1, gy.shape[-1]))
                    )
            for module, pairs in per_module.items():
                x = torch.cat([a for a, _ in pairs], dim=1)
                gy = torch.cat([b for _, b in pairs], dim=1)
                if x.shape[1] == 1:
                    x, gy = x[:, 0], gy[:, 0]
                # no s1= here: this route asks autograd for the output gradients only, so no weight gradient exists
                # to reuse; asking for it too would run the very GEMM that s1= saves (S1 is formed once either way)
                S1w, S2w, B1, B2 = ops.linear_moments(x, gy, bias=True)
                weight, bias = self._weights[module]
                for p, s1, s2 in ((weight, S1w, S2w), (bias, B1, B2)):
                    if p is None or id(p) not in where:
                        continue
                    bank, j = where[id(p)]
                    bank.row_views(bank.S1, r)[j].copy_(s1)
                    bank.row_views(bank.S2, r)[j].copy_(s2)
                    reached.add(id(p))
            for bank in banks:
                bank.n[r] = N

    # -- logging ----------------------------------------------------------------------------------------------
    def stats(self) -> dict[str, float]:
        """Per objective over all shared parameters: mean belief, fraction of elements with zero evidence, and
        the kept fraction of the gradient norm sqrt(sum (b mu)^2 / sum mu^2)."""
        out: dict[str, float] = {}
        if not self._last:
            return out
        names = self._last[0][0]
        weights = [layout.numel for layout in self.layouts]
        # Sums add over groups; the two means are weighted by each group's element count.
        total = sum(
            torch.stack([s[:, 0], s[:, 1], s[:, 2] * w, s[:, 3] * w], 1).double().cpu()
            for (_, s), w in zip(self._last, weights)
        )
        D = sum(weights)
        for r, name in enumerate(names):
            norm2, kept2, b, zero = total[r].tolist()
            out[f"{name}/belief"] = b / D
            out[f"{name}/zero_evidence"] = zero / D
            out[f"{name}/kept_norm"] = (kept2 / norm2) ** 0.5 if norm2 > 0 else 0.0
        return out


def _record(method_ref, module, args, output):
    method = method_ref()
    if method is not None and torch.is_grad_enabled() and output.requires_grad:
        method._calls.setdefault(module, []).append((args[0].detach(), output))


def _record_unsharded(method_ref, module, names):
    """FSDP2 pre-forward: the tensors FSDP2 has set on `module` for this forward (its unsharded parameters)."""
    method = method_ref()
    if method is not None:
        for name, key in names:
            method._unsharded[key] = module._parameters[name]


def _forget(method_ref):
    """A new forward of the model: the previous forward's recorded calls are not needed by any coming backward."""
    method = method_ref()
    if method is not None and torch.is_grad_enabled():
        method._calls = {}


def _remove(handles):
    for handle in handles:
        handle.remove()
    handles.clear()


def _param_groups(module) -> list:
    """FSDP2's parameter groups of one fully_shard-ed module (none when it manages no parameters)."""
    state = module._get_fsdp_state()
    groups = getattr(state, "_fsdp_param_groups", None)
    if groups is None:
        group = getattr(state, "_fsdp_param_group", None)
        groups = [] if group is None else [group]
    return list(groups)
