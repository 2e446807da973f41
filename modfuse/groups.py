"""The groups layer: parameter groups, gradient capture into flat banks, and every collective (DESIGN.md).

Below the methods and above the ops: a method asks a `Groups` for gradients (plain, into flat banks, or per
objective) and for reductions across ranks, and never sees how the model is wrapped or how many ranks there are.

Wrappers (detected from the model given, or from the module inside it):
- none, or a plain process group: the Balancer reduces everything itself.
- DistributedDataParallel: DDP's own gradient sync is switched off for good (`require_backward_grad_sync = False`,
  what `no_sync()` does for one block), because the Balancer's several backwards per step cannot pair with DDP's
  one-backward reducer; the Balancer then reduces through its own packed collectives, so every gradient is
  reduced exactly once. Buffers are still broadcast before each forward, as DDP does.
- FSDP2 (`fully_shard`): gradients flow through FSDP2's own reduce-scatter (one backward per step); calibrated
  (per_sample route) reduce-scatters its moment banks onto the ranks' own shards (`reduce_scatter_to_shards`) and
  writes Op 4's result into each rank's shard of `.grad`; every method runs there, each computing its
  whole-tensor statistics as shard-local partial sums summed in one tiny all-reduce (README, "Distributed
  training").

Distributed rules, for every method: rank r's gradient counts N_r / N (N_r its batch size, N the sum over
ranks), which is what one process on the concatenated batch gives for mean-reduced losses; all decisions that
could differ between ranks (an error, a non-finite loss, a parameter reached on some ranks only) are agreed in
one tiny all-reduce before any gradient collective, so that every rank skips or raises together.

Overlap (plain process group and DDP): a method whose step is one plain backward whose gradients are then only
reduced (`backward_reduced`, `backward_into_banks_reduced`) gets its gradients all-reduced in buckets of at most
`bucket_cap_mb` that start while the backward still runs, as DDP's reducer does (`_overlapped` says how); the
others reduce after their backwards: mmpareto in one packed collective (`all_reduce_`), calibrated by default with
a reduce-scatter of its moment banks, Op 4 on each rank's slice and an all-gather (`scatter_apply_gather`).

Persistent buffers: every D-sized buffer of a step (the encoder banks whose rows are `.grad`, the flat buffers of
a collective, a method's scratch rows) comes from `Groups.buffer`, allocated once per (purpose, shape) and reused
every step, so a step first-touches no fresh pages. A buffer that a gradient held before the current Balancer call
lives in (`.grad` kept for accumulation, or zeroed in place by `optimizer.zero_grad(set_to_none=False)`) is never
handed out during that call: a second buffer is (so accumulation and rollback still see the old gradient intact).
Like DDP's gradient_as_bucket_view, a `.grad` is a view of such a buffer: a reference kept to it past the next
calls (after zero_grad(set_to_none=True)) sees later steps' values; clone it to keep it.
"""

from __future__ import annotations

import gc
import heapq
import math
import weakref
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

from modfuse import ops
from modfuse.banks import FlatParams

REPLICAS = ("check", "broadcast", "trust")


class NonFiniteGradient(FloatingPointError):
    """A gradient written by the Balancer is NaN or Inf (handled by the on_nonfinite policy)."""


def distributed() -> bool:
    """True when torch.distributed is initialised with more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def collective_device(params_device: torch.device | None = None) -> torch.device:
    """Where the Balancer's small CPU tensors (agreement flags, statistics, scores) must be for a collective of the
    default process group: the CPU under gloo or mpi (or a per-device backend with a CPU part, such as
    "cpu:gloo,cuda:nccl", torch's default); else (NCCL has no CPU path) the model's accelerator `params_device`,
    as DDP uses the module's device (the current device is cuda:0 on every rank of a script that never called
    torch.cuda.set_device), or the current accelerator."""
    backend = str(dist.get_backend()).lower()
    parts = [b.split(":")[0].strip() for b in backend.split(",")] if ":" in backend else []
    if "cpu" in parts or backend in ("gloo", "mpi"):
        return torch.device("cpu")
    if params_device is not None and params_device.type != "cpu":
        return params_device
    api = getattr(torch, "accelerator", None)  # torch >= 2.6
    if api is not None:
        accelerator = api.current_accelerator() if api.is_available() else None
        index = api.current_device_index() if accelerator is not None else None
    else:
        accelerator = torch.device("cuda") if torch.cuda.is_available() else None
        index = torch.cuda.current_device() if accelerator is not None else None
    if accelerator is None:
        raise RuntimeError(
            f"the default process group's backend {backend!r} has no CPU path and no accelerator is available: "
            "init the process group with backend='gloo' (CPU) or 'cpu:gloo,cuda:nccl'"
        )
    return torch.device(accelerator.type, index)


def _named(names: dict[int, str], what, group: str) -> list[tuple[str, torch.nn.Parameter]]:
    """Trainable (name, parameter) pairs of a module or an iterable of parameters, all belonging to the model."""
    params = what.parameters() if isinstance(what, torch.nn.Module) else what
    if isinstance(params, torch.Tensor):
        params = [params]
    out = []
    for p in params:
        if not isinstance(p, torch.nn.Parameter):
            raise TypeError(
                f"{group} must be a module or an iterable of nn.Parameter, got an item of type {type(p).__name__}"
            )
        if id(p) not in names:
            raise ValueError(
                f"a parameter of {group} (shape {tuple(p.shape)}) is not a parameter of the model given to Balancer"
            )
        if p.requires_grad:
            out.append((names[id(p)], p))
    return out


def _find_ddp(module: torch.nn.Module):
    """The DistributedDataParallel that wraps `module`, if any (the user may hand us `ddp.module`).

    DDP keeps no back-reference, so walk up who holds the module (its `_modules` dict, that dict's owner, ...)
    a few levels, once, at construction.
    """
    from torch.nn.parallel import DistributedDataParallel as DDP

    level, seen = [module], {id(module)}
    for _ in range(3):
        up = []
        for obj in level:
            for holder in gc.get_referrers(obj):
                if isinstance(holder, DDP) and holder.module is module:
                    return holder
                if isinstance(holder, dict) and id(holder) not in seen:
                    seen.add(id(holder))
                    up.append(holder)
        level = up
    return None


def unwrap(model: torch.nn.Module):
    """(the module holding the parameters, the DDP wrapper or None, True under FSDP2)."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    ddp = model if isinstance(model, DDP) else (_find_ddp(model) if distributed() else None)
    module = ddp.module if ddp is not None else model
    fsdp = False
    try:
        from torch.distributed.fsdp import FSDPModule

        fsdp = any(isinstance(m, FSDPModule) for m in module.modules())
    except ImportError:  # pragma: no cover - torch without FSDP2
        pass
    return module, ddp, fsdp


@dataclass
class Agreement:
    """What all ranks agreed on before a step's gradient collectives."""

    failed_ranks: list[int]
    nonfinite: bool
    batch: float  # N: the sum of the ranks' batch sizes
    rows: list[float]  # per objective row: samples over all ranks that have it (0: absent everywhere)
    ranks_with_row: list[int]


class Groups:
    """The parameter groups of a model and everything that moves their gradients.

    `encoders` (modality -> module or parameters), `shared` (module or parameters) and the rest of the model's
    trainable parameters ("others"), each laid out once as flat banks (`FlatParams`, one per device and dtype).
    """

    def __init__(
        self, model: torch.nn.Module, encoders, shared=None, *, replicas: str = "check", bucket_cap_mb: float = 25.0
    ):
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if replicas not in REPLICAS:
            raise ValueError(f"replicas must be one of {', '.join(map(repr, REPLICAS))}, got {replicas!r}")
        if isinstance(bucket_cap_mb, bool) or not isinstance(bucket_cap_mb, (int, float)) or not bucket_cap_mb > 0:
            raise ValueError(
                "bucket_cap_mb must be a number > 0 (megabytes of gradients per overlapped all-reduce, default 25 "
                f"as DDP's; float('inf') for one collective after the backward), got {bucket_cap_mb!r}"
            )
        self.bucket_cap_bytes = float(bucket_cap_mb) * 2**20
        self.model, self.ddp, self.fsdp = unwrap(model)
        self.wrapper = "FSDP2 (fully_shard)" if self.fsdp else ("DistributedDataParallel" if self.ddp else None)
        self.names = names = {id(p): n for n, p in self.model.named_parameters()}
        self.modalities = [str(m) for m in encoders]
        self.encoders = {str(m): _named(names, e, f"encoders[{m!r}]") for m, e in encoders.items()}
        self.shared = _named(names, shared, "shared") if shared is not None else []
        owner: dict[int, str] = {}
        for group, pairs in [(f"encoders[{m!r}]", ps) for m, ps in self.encoders.items()] + [("shared", self.shared)]:
            for name, p in pairs:
                if id(p) in owner:
                    raise ValueError(
                        f"parameter {name!r} is in both {owner[id(p)]} and {group}: each parameter "
                        "may belong to one group only"
                    )
                owner[id(p)] = group
        self.others = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad and id(p) not in owner]
        self.trainable = (
            [p for _, ps in self.encoders.items() for _, p in ps]
            + [p for _, p in self.shared]
            + [p for _, p in self.others]
        )
        self.encoder_layouts = {m: self.layouts(pairs) for m, pairs in self.encoders.items()}
        self.shared_layouts = self.layouts(self.shared)
        self.distributed = distributed()
        self.world = dist.get_world_size() if distributed() else 1
        self.rank = dist.get_rank() if distributed() else 0
        # CPU tensors of a collective are staged here (the current GPU under NCCL), see collective_device()
        first = self.trainable[0] if self.trainable else None
        local = first.to_local() if hasattr(first, "to_local") else first
        self.comm_device = collective_device(None if local is None else local.device) if distributed() else None
        self.comm_device = self.comm_device or torch.device("cpu")
        self.weight = 1.0 / self.world  # this rank's share of the step (N_r / N), set by agree()
        self.synced = True  # False inside Balancer.no_sync(): collectives are deferred
        self._buffers: dict[tuple, list[torch.Tensor]] = {}  # persistent step buffers, see buffer()
        self._busy: set[int] = set()  # storages of the gradients held before the current call, see hold()
        self._layouts: dict[tuple, list[FlatParams]] = {}  # layouts of parameter lists, by parameter ids
        self._capture: dict[int, torch.Tensor] = {}  # id(param) -> bank view its next gradient is copied into
        self._capture_hooks: list = []
        self._views: dict[tuple, list[torch.Tensor]] = {}  # per-parameter views of persistent buffers
        self.pending: dict[int, torch.Tensor] = {}  # id(p) -> local gradient accumulated under no_sync
        self._plans: dict[tuple, _Plan] = {}  # bucket plans of the overlapped reduction, see backward_reduced()
        self._armed: _Step | None = None  # the overlapped backward in progress (its hooks act only then)
        self._overlap_hooks: list = []
        if self.ddp is not None:
            # DDP's reducer expects exactly one backward per forward; the Balancer runs several, so it reduces
            # itself (see the module docstring).
            # Restored by close(), or when the Groups is collected (a discarded Balancer).
            self._give_back = weakref.finalize(
                self, setattr, self.ddp, "require_backward_grad_sync", self.ddp.require_backward_grad_sync
            )
            self.ddp.require_backward_grad_sync = False
        elif distributed() and not self.fsdp and replicas != "trust":
            self._check_replicas(broadcast=replicas == "broadcast")

    # -- layout -----------------------------------------------------------------------------------------------
    def layouts(self, pairs: list[tuple[str, torch.nn.Parameter]]) -> list[FlatParams]:
        """Split (name, param) pairs into one FlatParams per (device, dtype), in order."""
        groups: dict[tuple, list] = {}
        for name, p in pairs:
            groups.setdefault((p.device, p.dtype), []).append((name, p))
        return [FlatParams([p for _, p in g], [n for n, _ in g]) for g in groups.values()]

    def name_of(self, p: torch.nn.Parameter) -> str:
        return self.names.get(id(p), f"<parameter of shape {tuple(p.shape)}>")

    def layouts_of(self, params: Sequence[torch.nn.Parameter]) -> list[FlatParams]:
        """`layouts` of a list of parameters, built once per list (the same lists come back every step)."""
        key = tuple(map(id, params))
        if key not in self._layouts:
            self._layouts[key] = self.layouts([(self.name_of(p), p) for p in params])
        return self._layouts[key]

    # -- persistent buffers ------------------------------------------------------------------------------------
    def hold(self, grads: Iterable[torch.Tensor | None]) -> None:
        """A Balancer call starts: `grads` (what `.grad` held before it) must survive the call untouched, so no
        buffer they live in is handed out until the next call."""
        self._busy = {_storage(g) for g in grads if g is not None}
        self._busy.update(_storage(g) for g in self.pending.values() if g is not None)

    def buffer(self, purpose, shape, dtype: torch.dtype, device, *, zero: bool = False, scratch: bool = False):
        """A persistent [shape] buffer for `purpose` (any hashable: the same purpose and shape get the same
        buffer every step), zero-filled if asked. Never one that a gradient held before this call lives in (see
        `hold`); a buffer handed out is kept from the call's other requests unless `scratch` (read back within
        one function, never left in `.grad`). At most three buffers per purpose and shape are kept."""
        pool = self._buffers.setdefault((purpose, tuple(shape), dtype, torch.device(device)), [])
        for buf in pool:
            if _storage(buf) not in self._busy:
                break
        else:
            buf = torch.empty(shape, dtype=dtype, device=device)
            pool.append(buf)
            if len(pool) > 3:  # the dropped one lives on only through the gradients that view it
                pool.pop(0)
                self._views = {}  # its address may come back with another buffer
        if not scratch:
            self._busy.add(_storage(buf))
        return buf.zero_() if zero else buf

    def views(self, layout: FlatParams, flat: torch.Tensor) -> list[torch.Tensor]:
        """`layout.views(flat)` of a flat row of a persistent buffer, made once (a step reuses the same rows)."""
        key = (id(layout), flat.data_ptr(), flat.dtype)
        if key not in self._views:
            self._views[key] = layout.views(flat)
        return self._views[key]

    def _bank(self, layout: FlatParams, rows: int, purpose: str = "bank", zero: bool = False) -> torch.Tensor:
        return self.buffer((purpose, id(layout)), (rows, layout.numel), layout.dtype, layout.device, zero=zero)

    # -- gradient capture (local; no collective) ---------------------------------------------------------------
    def backward(self, loss: torch.Tensor, params: Sequence[torch.nn.Parameter], retain_graph: bool = False) -> None:
        """Plain backward of `loss` into the `.grad` of `params` (accumulating)."""
        if self.fsdp:
            # FSDP2's graph leaves are its unsharded parameters, so no inputs= restriction; its reduce-scatter
            # averages over ranks, so scale by world * N_r / N for the per-sample rule.
            (loss * (self.weight * self.world)).backward(retain_graph=retain_graph)
        else:
            torch.autograd.backward(loss, inputs=list(params), retain_graph=retain_graph)

    @staticmethod
    def grads(loss: torch.Tensor, params: Sequence[torch.nn.Parameter]) -> tuple:
        """Gradients of `loss` w.r.t. `params` (None where unreached), keeping the graph for more backwards."""
        return torch.autograd.grad(loss, list(params), retain_graph=True, allow_unused=True)

    def backward_into_banks(self, total: torch.Tensor, rows: int = 1):
        """Plain backward of `total` with every encoder's gradients landing in one flat bank per encoder.

        For each encoder (and each device/dtype inside it) a persistent [rows, D] bank (`buffer`): each
        parameter's gradient is copied into its view of row 0 as soon as autograd has accumulated it (a
        post-accumulate hook, registered once), and `.grad` becomes that view (DDP's gradient_as_bucket_view), so
        a method can modulate all of an encoder's gradients with one launch. Copying in costs one pass and no
        zero-fill of the bank; the segments of unreached parameters are zeroed. Rows 1.. are free for the
        method (not zeroed). Returns (banks: modality -> [(layout, buffer)], reached: ids of the parameters the
        backward reached). Nothing is reduced yet: see `reduce_encoder_banks`.
        """
        banks = {
            m: [(layout, self._bank(layout, rows)) for layout in layouts] for m, layouts in self.encoder_layouts.items()
        }
        if not self._capture_hooks:
            me = weakref.ref(self)
            for layouts in self.encoder_layouts.values():
                for layout in layouts:
                    for p in layout.params:
                        self._capture_hooks.append(p.register_post_accumulate_grad_hook(lambda q: _capture(me, q)))
            self._drop_hooks = weakref.finalize(self, _remove, self._capture_hooks)
        for layouts in banks.values():
            for layout, buf in layouts:
                for p, view in zip(layout.params, self.views(layout, buf[0])):
                    p.grad = None
                    self._capture[id(p)] = view
        try:
            torch.autograd.backward(total, inputs=self.trainable)
        finally:
            self._capture = {}
        reached: set[int] = set()
        for layouts in banks.values():
            for layout, buf in layouts:
                for p, view in zip(layout.params, self.views(layout, buf[0])):
                    if p.grad is None:
                        view.zero_()  # the collective and the fused ops read the whole bank
                    else:
                        reached.add(id(p))
        return banks, reached

    # -- collectives ---------------------------------------------------------------------------------------------
    def agree(self, failed: bool, nonfinite: bool, batch: int, rows: Sequence[int]) -> Agreement:
        """One tiny all-reduce: did any rank fail or see a non-finite loss, the batch sizes, the objective rows
        present per rank. Sets this rank's weight N_r / N."""
        if not distributed() or not self.synced:  # inside no_sync(): local decisions, no collective
            return Agreement(
                [0] if failed else [], nonfinite, float(batch), [float(r) for r in rows], [int(r > 0) for r in rows]
            )
        W = self.world
        flags = torch.zeros(W + 2 + 2 * len(rows), dtype=torch.float64)
        flags[self.rank] = float(failed)
        flags[W] = float(nonfinite)
        flags[W + 1] = float(batch)
        flags[W + 2 : W + 2 + len(rows)] = torch.tensor([float(r) for r in rows], dtype=torch.float64)
        flags[W + 2 + len(rows) :] = torch.tensor([float(r > 0) for r in rows], dtype=torch.float64)
        flags = flags.to(self.comm_device)
        dist.all_reduce(flags, op=dist.ReduceOp.SUM)
        values = flags.tolist()
        N = values[W + 1]
        self.weight = batch / N if N > 0 else 1.0 / W
        return Agreement(
            [r for r in range(W) if values[r] > 0],
            values[W] > 0,
            N,
            values[W + 2 : W + 2 + len(rows)],
            [int(v) for v in values[W + 2 + len(rows) :]],
        )

    def all_reduce_(self, weighted: Iterable[torch.Tensor] = (), summed: Iterable[torch.Tensor] = ()) -> None:
        """Sum tensors over ranks in place, `weighted` ones after scaling by this rank's N_r / N.

        Everything is packed into one flat buffer per (device, dtype): one collective per dtype, whatever the
        number of tensors. A no-op in a single process (and inside no_sync()).
        """
        if not distributed() or not self.synced:
            return
        items = [(t, True) for t in weighted] + [(t, False) for t in summed]
        by_kind: dict[tuple, list] = {}
        for t, w in items:  # CPU tensors go with the comm device's (NCCL: the current GPU)
            by_kind.setdefault((self.comm_device if t.device.type == "cpu" else t.device, t.dtype), []).append((t, w))
        for (device, dtype), group in by_kind.items():
            sizes = [t.numel() for t, _ in group]
            flat = self.buffer("all_reduce_", (sum(sizes),), dtype, device, scratch=True)
            for part, (t, w) in zip(flat.split(sizes), group):
                if w and t.device == part.device:
                    torch.mul(t.reshape(-1), self.weight, out=part)
                else:  # (a CPU tensor staged on the comm device: mul's out cannot cross devices)
                    part.copy_(t.reshape(-1))
                    if w:
                        part.mul_(self.weight)
            dist.all_reduce(flat, op=dist.ReduceOp.SUM)
            start = 0
            for t, _ in group:
                t.copy_(flat[start : start + t.numel()].view_as(t))
                start += t.numel()

    def scatter_apply_gather(self, rows: torch.Tensor, apply, extra: torch.Tensor, extra_weighted: int):
        """Shard-local reduction of an element-wise op (Op 4) over a [C, D] bank, in 2 collectives.

        The bank is summed over ranks but each rank receives only its 1/W slice of D (reduce-scatter); `apply`
        maps that [C, D/W] slice to ([D/W] result, [k] per-slice sums); one all-gather returns the whole [D]
        result and every rank's sums. `extra` (flat, the bank's dtype; its first `extra_weighted` elements scaled
        by N_r / N) is summed in the same two collectives. Bytes per rank, ring algorithms: (W-1)/W (C D + D)
        against 2 (W-1)/W C D for an all-reduce of the bank. Returns (result [D], summed sums [k], extra).
        """
        W, (C, D), E = self.world, rows.shape, extra.numel()
        Dw, Ew = -(-D // W), -(-E // W)
        kw = {"dtype": rows.dtype, "device": rows.device, "scratch": True}  # persistent, read back in here only
        send = self.buffer("scatter_apply_gather.send", (W, C * Dw + Ew), **kw)
        padded = self.buffer("scatter_apply_gather.padded", (C, W * Dw), **kw)
        padded[:, :D] = rows
        padded[:, D:] = 0
        send[:, : C * Dw].view(W, C, Dw).copy_(padded.view(C, W, Dw).transpose(0, 1))
        tail = self.buffer("scatter_apply_gather.tail", (W * Ew,), **kw)
        tail[:E] = extra
        tail[E:] = 0
        tail[:extra_weighted] *= self.weight
        send[:, C * Dw :] = tail.view(W, Ew)
        mine = self.buffer("scatter_apply_gather.mine", (C * Dw + Ew,), **kw)
        dist.reduce_scatter_tensor(mine, send.view(-1), op=dist.ReduceOp.SUM)
        # the last rank's slice may hold padding (zeros): `apply` is told how many elements are real
        real = max(0, min(D - self.rank * Dw, Dw))
        out, sums = apply(mine[: C * Dw].view(C, Dw), real)
        payload = torch.cat([out.to(rows.dtype), mine[C * Dw :], sums.to(rows.dtype).reshape(-1)])
        gathered = self.buffer("scatter_apply_gather.gathered", (W * payload.numel(),), **kw)
        dist.all_gather_into_tensor(gathered, payload)
        rows_of = gathered.view(W, -1)
        # the results become `.grad`: never views of the scratch buffer (reshape copies these strided slices)
        result = _own(rows_of[:, :Dw].reshape(-1)[:D], gathered)
        extra_out = _own(rows_of[:, Dw : Dw + Ew].reshape(-1)[:E], gathered)
        return result, rows_of[:, Dw + Ew :].sum(0), extra_out

    def shard_range(self, p: torch.nn.Parameter) -> tuple[int, int]:
        """FSDP2: (first element, element count) of this rank's shard of `p` within p's flattened full tensor
        (`Shard(0)`: chunks of ceil(d0 / W) rows, the last ones shorter or empty)."""
        d0 = p.shape[0] if p.dim() else 1
        r = p.numel() // max(d0, 1)
        chunk = -(-d0 // self.world)
        return self.rank * chunk * r, max(0, min(d0 - self.rank * chunk, chunk)) * r

    def reduce_scatter_to_shards(self, layout: FlatParams, rows: torch.Tensor, replicated: torch.Tensor):
        """FSDP2: sum a [C, D] bank over ranks, each rank receiving only the elements of its own parameter shards.

        `layout` holds DTensor parameters sharded on dim 0 (FSDP2's `Shard(0)`: chunks of ceil(d0 / W) rows, the
        last ones shorter or empty). Rank w receives, for every parameter in order, the [C, ceil(d0 / W) * r]
        block of its rows (zero-padded past d0), in one reduce-scatter; `replicated` (flat, the bank's dtype) rides
        along and every rank receives its sum over ranks. Bytes per rank, ring algorithm: (W-1)/W (C D + W E),
        and no all-gather. Returns (mine [C, L] with L = sum of the padded block sizes, [(param, start, numel)]
        where each parameter's real local elements sit in mine, summed `replicated`).
        """
        W, C, E = self.world, rows.shape[0], replicated.numel()
        kw = {"dtype": rows.dtype, "device": rows.device}
        blocks, where, start = [], [], 0
        for p, (a, b) in zip(layout.params, layout._bounds):
            d0 = p.shape[0] if p.dim() else 1
            r = (b - a) // max(d0, 1)
            chunk = -(-d0 // W)
            blocks.append((a, b, start, chunk * r))
            local_rows = max(0, min(d0 - self.rank * chunk, chunk))
            where.append((p, start, local_rows * r))
            start += chunk * r
        L = start
        # persistent send buffer, each rank's blocks written straight into its row (zero past each d0)
        send = self.buffer("reduce_scatter_to_shards.send", (W, C * L + E), **kw, scratch=True)
        body = send[:, : C * L].view(W, C, L)
        for a, b, at, width in blocks:
            for w in range(W):
                lo, hi = a + w * width, min(a + (w + 1) * width, b)
                real = max(hi - lo, 0)
                if real:
                    body[w, :, at : at + real] = rows[:, lo:hi]
                if real < width:
                    body[w, :, at + real : at + width] = 0
        send[:, C * L :] = replicated.reshape(1, E)
        mine = self.buffer("reduce_scatter_to_shards.mine", (C * L + E,), **kw)
        dist.reduce_scatter_tensor(mine, send.view(-1), op=dist.ReduceOp.SUM)
        return mine[: C * L].view(C, L), where, mine[C * L :]

    def grads_to_reduce(self, params: Sequence[torch.nn.Parameter]) -> tuple[list, list, torch.Tensor | None]:
        """Flat buffers holding the local `.grad` of `params` (zeros where None, plus what no_sync() deferred)
        and a reached flag per parameter, to pack into a step's collective; `finish_grads` writes them back.
        The flat buffers are persistent (`buffer`): after `finish_grads` the `.grad` are views of them."""
        if not distributed() or self.fsdp or not params:
            return [], [], None
        layouts = self.layouts_of(params)
        flats = []
        for layout in layouts:
            flat = self._bank(layout, 1, "grads_to_reduce")[0]
            for p, view in zip(layout.params, self.views(layout, flat)):
                if p.grad is None:
                    view.zero_()
                else:
                    view.copy_(p.grad)
                if id(p) in self.pending:
                    view.add_(self.pending[id(p)])
            flats.append(flat)
        first = layouts[0]
        reached = torch.tensor(
            [float(p.grad is not None or id(p) in self.pending) for layout in layouts for p in layout.params],
            dtype=first.dtype,
            device=first.device,
        )
        return list(zip(layouts, flats)), flats, reached

    def finish_grads(self, pairs, reached: torch.Tensor | None) -> None:
        """After the collective: reduced gradients back into `.grad`; None where no rank reached the parameter."""
        if reached is None:
            return
        flags = iter(reached.tolist())
        for layout, flat in pairs:
            for p, view in zip(layout.params, self.views(layout, flat)):
                p.grad = view if next(flags) > 0 else None

    def reduce_grads_(self, params: Sequence[torch.nn.Parameter], weighted=(), summed=()) -> None:
        """Weighted sum of the `.grad` of `params` over ranks, plus any other tensors, in one packed collective."""
        if not self.synced:
            return
        pairs, flats, reached = self.grads_to_reduce(params)
        self.all_reduce_(weighted=[*flats, *weighted], summed=[*summed, *([] if reached is None else [reached])])
        self.finish_grads(pairs, reached)

    # -- overlapped reduction (plain process group, DDP) ----------------------------------------------------------
    def backward_reduced(self, loss: torch.Tensor) -> None:
        """One plain backward of `loss` into the `.grad` of every trainable parameter, summed over ranks (this
        rank's part weighted by N_r / N) by all-reduces that start while the backward still runs (see
        `_overlapped`). FSDP2 reduce-scatters in its own backward; one process, or inside no_sync(): a plain
        backward (plus what `reduce_grads_` does there: nothing)."""
        if self.fsdp or not self.distributed or not self.synced:
            self.backward(loss, self.trainable)
            if not self.fsdp:
                self.reduce_grads_(self.trainable)
            return
        self._overlapped(loss, banks=False, rows=1, summed=())

    def backward_into_banks_reduced(self, total: torch.Tensor, rows: int = 1, summed=()):
        """`backward_into_banks` and the reduction of the banks, every other gradient and `summed` (sums over
        ranks, not weighted) in collectives that start while the backward still runs. The encoder banks are
        slices of the step's bucket buffer (one per device and dtype), so a bank is all-reduced where it lies and
        no gradient is copied twice. Returns the banks as `backward_into_banks` does; unreached parameters end
        with `.grad = None`."""
        return self._overlapped(total, banks=True, rows=rows, summed=summed)

    def _overlapped(self, loss: torch.Tensor, banks: bool, rows: int, summed: Sequence[torch.Tensor]):
        """Bucketed all-reduce overlapped with the backward, as DDP's reducer does it.

        Row 0 of one persistent [rows, width] buffer per (device, dtype) holds this rank's gradient times N_r / N,
        cut into buckets of at most `bucket_cap_mb` (`_plan`). A post-accumulate-grad hook, armed for this one
        backward only, copies each gradient into its slot the moment autograd has accumulated it (and drops the
        autograd-made tensor); when a bucket's last gradient has arrived, it and every complete bucket after the
        last one launched start an async all-reduce. Buckets start strictly in plan order, so every rank issues
        the same collectives in the same order whatever its autograd timing or unreached parameters (DDP's rule).
        After the backward the remaining buckets start, their unreached slots zeroed (or holding what no_sync()
        deferred); the last bucket carries each parameter's "reached" flag and the `summed` tensors of its dtype,
        so a model below the cap takes one collective. Then every handle is waited for in launch order and `.grad`
        becomes the parameter's view of row 0, None where no rank reached it.
        """
        plan = self._plan(banks, summed)
        if not self._overlap_hooks:
            me = weakref.ref(self)
            for p in self.trainable:
                self._overlap_hooks.append(p.register_post_accumulate_grad_hook(lambda q: _arrive(me, q)))
            self._drop_overlap_hooks = weakref.finalize(self, _remove, self._overlap_hooks)
        step = _Step(self, plan, rows, summed)
        self._armed = step
        try:
            torch.autograd.backward(loss, inputs=self.trainable)
        except BaseException:
            # the buckets already launched must finish before their buffer can be handed out again (the other
            # ranks still wait for the rest until the process group's timeout, as with any collective)
            for handle in step.handles:
                handle.wait()
            raise
        finally:
            self._armed = None
        step.finish()
        rest = [t for t in summed if (t.device, t.dtype) not in plan.kinds]
        if rest:  # summed tensors of a dtype no gradient has: their own packed collective, as before
            self.all_reduce_(summed=rest)
        if not banks:
            return None
        return {m: [(layout, step.bank(layout)) for layout in layouts] for m, layouts in self.encoder_layouts.items()}

    def _plan(self, banks: bool, summed: Sequence[torch.Tensor]) -> _Plan:
        """The bucket plan of an overlapped backward, built once per (mode, the shapes of `summed`)."""
        key = (banks, tuple((t.device, t.dtype, t.numel()) for t in summed))
        if key not in self._plans:
            # registration order: autograd usually finishes the parameters in its reverse (DDP's assumption); the
            # encoder banks stay whole (one segment each), the other parameters follow them
            trainable = {id(p) for p in self.trainable}  # (requires_grad as at construction, where hooks are)
            registered = [p for p in self.model.parameters() if id(p) in trainable]
            if banks:
                encoder_ids = {id(p) for layouts in self.encoder_layouts.values() for fp in layouts for p in fp.params}
                rest = [p for p in registered if id(p) not in encoder_ids]
                segments = [fp for layouts in self.encoder_layouts.values() for fp in layouts]
                segments += self.layouts_of(rest) if rest else []
            else:
                segments = self.layouts_of(registered)
            order = {id(p): i for i, p in enumerate(reversed(list(self.model.parameters())))}
            self._plans[key] = _Plan(segments, summed, self.bucket_cap_bytes, order)
        return self._plans[key]

    def check_finite(self, params: Sequence[torch.nn.Parameter], proven: Sequence[tuple] = ()) -> list[str]:
        """Names of the parameters whose `.grad` holds a NaN or Inf: one fused 2-norm per dtype, one sync.

        A NaN or Inf element makes the 2-norm NaN or Inf, so a finite norm proves a finite tensor; the squared
        norms come from Op 1b (`tensor_sq_norms`, the tensors read where they are). A norm can also overflow on
        finite values (16-bit dtypes are accumulated in float32, which cannot; float32 squares can, past 1.8e19),
        so the few tensors flagged are confirmed with an exact `isfinite` pass.

        `proven`: (parameters, bounds) pairs from the method's own reductions of this step: every `|.grad|`
        element of those parameters is at most max(bounds). Where the bounds are below the dtype's largest
        finite value, the parameters are not read again (the method already read them: greedy's norms, ogm_ge's
        moments); otherwise they are checked exactly."""
        covered: dict[int, int] = {}
        for j, (ps, _) in enumerate(proven):
            covered.update((id(p), j) for p in ps)
        grads = [(p, p.grad) for p in params if p.grad is not None]
        if not grads:
            return []
        local = [g.to_local() if hasattr(g, "to_local") else g for _, g in grads]
        by_kind: dict[tuple, list[int]] = {}
        for i, g in enumerate(local):
            if id(grads[i][0]) not in covered and g.numel() > 0:
                by_kind.setdefault((g.device, g.dtype), []).append(i)
        sums: list[torch.Tensor] = []
        order: list[int] = []
        device = local[0].device  # everything is gathered there, then read with one device-to-host copy
        for idx in by_kind.values():
            sums.append(ops.tensor_sq_norms([local[i] for i in idx]).to(device, torch.float64))
            order += idx
        largest = {}
        for i, g in enumerate(local):
            j = covered.get(id(grads[i][0]))
            if j is not None:
                largest[j] = min(largest.get(j, math.inf), torch.finfo(g.dtype).max)
        bounds = [proven[j][1].detach().reshape(-1).amax().to(device, torch.float64).reshape(1) for j in largest]
        values = torch.cat(sums + bounds).cpu() if sums or bounds else torch.zeros(0, dtype=torch.float64)
        flagged = [order[j] for j in (~torch.isfinite(values[: len(order)])).nonzero().flatten().tolist()]
        failed = {j for j, b in zip(largest, values[len(order) :].tolist()) if not b < largest[j]}
        flagged += [i for i in range(len(grads)) if covered.get(id(grads[i][0]), -1) in failed]
        bad = sorted(i for i in flagged if not bool(torch.isfinite(local[i]).all()))
        return [self.name_of(grads[i][0]) for i in bad]

    def _check_replicas(self, broadcast: bool) -> None:
        """Parameters equal on every rank (as DDP checks at construction), or copied from rank 0."""
        params = [p for _, p in self.model.named_parameters()]
        for layout in self.layouts([(self.name_of(p), p) for p in params]):
            mine = layout.grad_rows(1)[0]
            layout.flatten_into(mine, [p.detach() for p in layout.params])
            theirs = mine.to(self.comm_device, copy=True) if mine.device.type == "cpu" else mine.clone()
            dist.broadcast(theirs, src=0)
            theirs = theirs.to(mine.device)
            if broadcast:
                with torch.no_grad():
                    for p, view in zip(layout.params, layout.views(theirs)):
                        p.copy_(view)
                continue
            differ = torch.tensor([0.0 if torch.equal(mine, theirs) else 1.0], dtype=torch.float64)
            differ = differ.to(self.comm_device)
            dist.all_reduce(differ)
            if differ.item() > 0:
                raise ValueError(
                    f"the model's parameters differ between ranks ({int(differ.item())} rank(s) differ "
                    "from rank 0): seed the initialisation identically, or pass replicas='broadcast' "
                    "to copy rank 0's parameters"
                )

    def close(self) -> None:
        """Give DDP its own gradient sync back and remove the capture hooks."""
        _remove(self._capture_hooks)
        _remove(self._overlap_hooks)
        if self.ddp is not None:
            self._give_back()  # runs once

    def after_step(self) -> None:
        """DDP broadcasts buffers before a forward only when its backward sync is on; keep that behaviour."""
        if self.ddp is not None:
            self.ddp.require_forward_param_sync = True


def _storage(t: torch.Tensor) -> int:
    """The address of the storage a tensor (or a DTensor's local shard) lives in."""
    return (t.to_local() if hasattr(t, "to_local") else t).untyped_storage().data_ptr()


def _own(t: torch.Tensor, scratch: torch.Tensor) -> torch.Tensor:
    """`t`, copied if it is a view of the scratch buffer (which the next step overwrites)."""
    return t.clone() if t.untyped_storage().data_ptr() == scratch.untyped_storage().data_ptr() else t


def _capture(groups_ref, p: torch.nn.Parameter) -> None:
    """Post-accumulate hook of an encoder parameter: inside backward_into_banks, move the gradient autograd just
    accumulated into the parameter's view of the bank and make `.grad` that view."""
    groups = groups_ref()
    view = groups._capture.get(id(p)) if groups is not None else None
    if view is not None and p.grad is not None and p.grad.data_ptr() != view.data_ptr():
        view.copy_(p.grad)
        p.grad = view


def _remove(handles) -> None:
    for handle in handles:
        handle.remove()
    handles.clear()


_ALIGN_BYTES = 16  # every segment of a bucket buffer starts 16-byte aligned (the fused ops' vector loads)


@dataclass
class _Bucket:
    kind: int  # index of the (device, dtype) buffer it lies in
    lo: int  # element range of row 0 it all-reduces
    hi: int
    params: list  # the parameters whose slots lie in it
    gaps: list  # (lo, hi) alignment padding inside it: zeroed at launch
    last: bool  # the last bucket of its buffer: it carries the flags and summed tensors at [0, tail)


class _Plan:
    """The fixed layout of an overlapped backward: per (device, dtype) a row [tail | segment | segment ...] (the
    tail: one "reached" flag per parameter, then the summed tensors of that dtype; each segment a FlatParams laid
    16-byte aligned), cut into buckets walking the parameters from the end of the row (the parameters autograd
    finishes first) to its start, each at most `cap` bytes of gradient (one parameter above the cap is a bucket of
    its own). Buckets launch in one order on every rank: each buffer's buckets in walk order, the buffers merged by
    the reverse-registration position of each bucket's first parameter."""

    def __init__(self, segments: list[FlatParams], summed: Sequence[torch.Tensor], cap: float, order: dict[int, int]):
        self.layouts = segments
        # an infinite cap: one bucket per dtype, launched after the backward (never during it, so a parameter that
        # autograd accumulates twice, e.g. under reentrant checkpointing, is always summed in full)
        self.overlap = math.isfinite(cap)
        by_kind: dict[tuple, list[FlatParams]] = {}
        for fp in segments:
            by_kind.setdefault((fp.device, fp.dtype), []).append(fp)
        self.kinds = list(by_kind)
        self.widths, self.flag_params, self.summed_at, self.where = [], [], [], {}
        per_kind_buckets = []
        for k, ((device, dtype), fps) in enumerate(by_kind.items()):
            align = max(1, _ALIGN_BYTES // torch.empty((), dtype=dtype).element_size())
            flags = [p for fp in fps for p in fp.params]
            at = len(flags)
            for i, t in enumerate(summed):
                if (t.device, t.dtype) == (device, dtype):
                    self.summed_at.append((i, k, at))
                    at += t.numel()
            tail = at
            slots = []  # (param, lo, hi) in row order
            for fp in fps:
                at = -(-at // align) * align
                self.where[id(fp)] = (k, at)
                slots += [(p, at + a, at + b) for p, (a, b) in zip(fp.params, fp._bounds)]
                at += fp.numel
            self.widths.append(at)
            self.flag_params.append(flags)
            buckets, current, size = [], [], 0.0
            for p, lo, hi in reversed(slots):
                nbytes = (hi - lo) * p.element_size()
                if current and size + nbytes > cap:
                    buckets.append(current)
                    current, size = [], 0.0
                current.append((p, lo, hi))
                size += nbytes
            buckets.append(current)
            made, top = [], at
            for i, members in enumerate(buckets):
                last = i == len(buckets) - 1
                lo = 0 if last else min(a for _, a, _ in members)
                covered = sorted([(a, b) for _, a, b in members] + ([(0, tail)] if last and tail else []))
                gaps, edge = [], lo
                for a, b in covered:
                    if a > edge:
                        gaps.append((edge, a))
                    edge = max(edge, b)
                if top > edge:
                    gaps.append((edge, top))
                made.append(_Bucket(k, lo, top, [p for p, _, _ in members], gaps, last))
                top = lo
            per_kind_buckets.append(made)
        self.tails = [len(f) for f in self.flag_params]
        self.buckets = list(heapq.merge(*per_kind_buckets, key=lambda b: order.get(id(b.params[0]), 0)))
        self.bucket_of = {id(p): i for i, b in enumerate(self.buckets) for p in b.params}


class _Step:
    """One overlapped backward in progress: the buffers, what has arrived, the launched collectives."""

    def __init__(self, groups: Groups, plan: _Plan, rows: int, summed: Sequence[torch.Tensor]):
        self.plan, self.summed = plan, summed
        self.weight, self.pending = groups.weight, groups.pending
        self.buffers = [
            groups.buffer(("overlap", id(plan), k), (rows, width), dtype, device)
            for k, ((device, dtype), width) in enumerate(zip(plan.kinds, plan.widths))
        ]
        self.slots: dict[int, torch.Tensor] = {}
        self.banks: dict[int, torch.Tensor] = {}
        for layout in plan.layouts:
            k, at = plan.where[id(layout)]
            self.banks[id(layout)] = self.buffers[k][:, at : at + layout.numel]
            for p, view in zip(layout.params, groups.views(layout, self.buffers[k][0, at : at + layout.numel])):
                self.slots[id(p)] = view
        self.left = [len(b.params) for b in plan.buckets]
        self.launched = 0
        self.handles: list = []
        self.reached: set[int] = set()

    def bank(self, layout: FlatParams) -> torch.Tensor:
        return self.banks[id(layout)]

    def arrive(self, p: torch.nn.Parameter) -> None:
        """Post-accumulate hook: this rank's weighted gradient into its slot; launch the buckets now complete."""
        b = self.plan.bucket_of.get(id(p))
        if b is None or p.grad is None:
            return
        slot, deferred = self.slots[id(p)], self.pending.get(id(p))
        if id(p) in self.reached:  # a second accumulation in one backward (reentrant checkpointing)
            if self.left[b] < 0:
                raise RuntimeError(
                    f"a parameter of shape {tuple(p.shape)} received a second gradient in one backward after its "
                    "bucket's all-reduce had started (reentrant activation checkpointing?): use "
                    "torch.utils.checkpoint with use_reentrant=False, or Balancer(bucket_cap_mb=float('inf')) "
                    "(one all-reduce per dtype after the backward, no overlap)"
                )
            slot.add_(p.grad, alpha=self.weight)
            p.grad = None
            return
        if deferred is None:
            torch.mul(p.grad, self.weight, out=slot)
        else:
            torch.add(p.grad, deferred, out=slot)
            slot.mul_(self.weight)
        p.grad = None  # the slot holds it now: autograd's tensor is freed at once, as with gradient_as_bucket_view
        self.reached.add(id(p))
        self.left[b] -= 1
        while self.plan.overlap and self.launched < len(self.left) and self.left[self.launched] == 0:
            self._launch(self.launched)

    def _launch(self, b: int) -> None:
        bucket = self.plan.buckets[b]
        row = self.buffers[bucket.kind][0]
        for p in bucket.params:
            if id(p) not in self.reached:
                deferred = self.pending.get(id(p))
                if deferred is None:
                    self.slots[id(p)].zero_()
                else:
                    torch.mul(deferred, self.weight, out=self.slots[id(p)])
        for lo, hi in bucket.gaps:
            row[lo:hi].zero_()
        if bucket.last:  # every earlier bucket of this buffer has launched, so the flags are final
            params = self.plan.flag_params[bucket.kind]
            flags = [float(id(p) in self.reached or id(p) in self.pending) for p in params]
            row[: len(params)].copy_(torch.tensor(flags, dtype=row.dtype))
            for i, k, at in self.plan.summed_at:
                if k == bucket.kind:
                    t = self.summed[i]
                    row[at : at + t.numel()].copy_(t.reshape(-1))
        self.handles.append(dist.all_reduce(row[bucket.lo : bucket.hi], op=dist.ReduceOp.SUM, async_op=True))
        self.left[b] = -1
        self.launched = b + 1

    def finish(self) -> None:
        """After the backward: launch what is left, in order; wait for every bucket; write `.grad` and `summed`."""
        while self.launched < len(self.left):
            self._launch(self.launched)
        for handle in self.handles:
            handle.wait()
        for k, params in enumerate(self.plan.flag_params):
            row = self.buffers[k][0]
            for p, flag in zip(params, row[: len(params)].tolist()):
                p.grad = self.slots[id(p)] if flag > 0 else None
        for i, k, at in self.plan.summed_at:
            t = self.summed[i]
            t.copy_(self.buffers[k][0, at : at + t.numel()].view(t.shape))


def _arrive(groups_ref, p: torch.nn.Parameter) -> None:
    """Post-accumulate hook of every trainable parameter: acts only inside an overlapped backward."""
    groups = groups_ref()
    step = groups._armed if groups is not None else None
    if step is not None:
        step.arrive(p)
