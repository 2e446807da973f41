"""Method "greedy": a greedy-style balancer: hold back the encoder that learns fastest (balanced learning speeds).

Source: Wu, Jastrzebski, Cho, Geras, "Characterizing and Overcoming the Greedy Nature of Learning in Multi-modal
Deep Neural Networks", ICML 2022 (nyukat/greedy_multimodal_learning). This is a GENERALISATION of that paper's
algorithm, not the algorithm itself: it keeps the paper's statistic (the conditional learning speed, per encoder)
and replaces its rebalancing, which only exists in the authors' MMTM architecture, by one that works on any
per-modality encoders and any M >= 2 (docs/math.md#greedy).

Learning speed of encoder m, accumulated each step:
    s_m += ||g_m||^2 / ||theta_m||^2          (over all of encoder m's parameters)
At a check, d_m = log10 s_m - mean_j log10 s_j (for M = 2 this is +-1/2 log10 of the authors' speed ratio);
when max_m d_m - min_m d_m > threshold, the fastest encoder is held for hold_steps (5) steps. Holding sets its
parameters' `.grad` to None, so the optimizer leaves them alone (a zeroed gradient would still move them through
Adam's momentum). Steps while an encoder is held do not add to the speeds.

Schedule options:
- default (modfuse's): a check at the end of every window (one epoch, or window_steps steps), the speeds summed
  over the window and restarted after it, threshold 0.3 (the paper's 0.01 fires on every check there);
- the authors' schedule: `window_steps=1, cumulative=True, start_epoch=2, threshold=0.01`: speeds summed from the
  start of training and never restarted, a check every step from epoch 2 (0-based) on.
`start_epoch` gates the checks in either schedule (checks of windows in earlier epochs decide nothing).

What differs from the authors' code, and why:
- rebalancing: the authors swap in the running average of the MMTM excitations during a "re-balancing" phase;
  here the fastest encoder's gradients are withheld for hold_steps steps (needs no particular architecture);
- the statistic is the same (speeds matched the authors' to 2e-7 on identical inputs, issue 16), summed over all of an
  encoder's parameters; the authors sum over the layers that feed their MMTM blocks.
Fused ops: a plain backward (gradients reduced over ranks like every plain-gradient method's), then one Op 1b
launch (tensor_sq_norms) per encoder gives the squared norms of every gradient and parameter tensor where they are:
no flat bank, no copy of the parameters (under FSDP2 the same launch reads the local shards).
"""

from __future__ import annotations

import torch

from modfuse import ops
from modfuse.methods import Method, register


def sq_norm_sums(grads: list[torch.Tensor], params: list[torch.Tensor]) -> torch.Tensor:
    """float64 [2]: (sum of every gradient's squared norm, sum of every parameter's), read where the tensors
    are: one tensor_sq_norms launch per dtype for both lists (one in total for a single-dtype encoder)."""
    tensors = grads + params
    is_grad = torch.tensor([True] * len(grads) + [False] * len(params))
    sums = torch.zeros(2, dtype=torch.float64)
    for dtype in dict.fromkeys(t.dtype for t in tensors):
        pick = [i for i, t in enumerate(tensors) if t.dtype == dtype]
        norms = ops.tensor_sq_norms([tensors[i] for i in pick]).double().cpu()
        mask = is_grad[pick]
        sums += torch.stack([norms[mask].sum(), norms[~mask].sum()])
    return sums


@register
class Greedy(Method):
    name = "greedy"
    requires = ()
    modulates_encoders = True
    plain_gradients = False
    fsdp2 = True

    def __init__(
        self,
        groups,
        threshold: float = 0.3,
        hold_steps: int = 5,
        window_steps: int | None = None,
        cumulative: bool = False,
        start_epoch: int = 0,
    ):
        super().__init__(groups)
        if len(groups.modalities) < 2:
            raise ValueError("method 'greedy' needs at least two modalities")
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not threshold >= 0:
            raise ValueError(f"threshold must be >= 0, got {threshold!r}")
        if not isinstance(hold_steps, int) or hold_steps < 1:
            raise ValueError(f"hold_steps must be an int >= 1, got {hold_steps!r}")
        if window_steps is not None and (not isinstance(window_steps, int) or window_steps < 1):
            raise ValueError(f"window_steps must be None (one epoch) or an int >= 1, got {window_steps!r}")
        if not isinstance(cumulative, bool):
            raise TypeError(f"cumulative must be True or False, got {cumulative!r}")
        if isinstance(start_epoch, bool) or not isinstance(start_epoch, int) or start_epoch < 0:
            raise ValueError(f"start_epoch must be an int >= 0, got {start_epoch!r}")
        self.threshold, self.hold_steps, self.window_steps = threshold, hold_steps, window_steps
        self.cumulative, self.start_epoch = cumulative, start_epoch
        self.epoch = 0  # 0-based index of the epoch of the last step
        device = groups.trainable[0].device
        self.speeds = torch.zeros(len(groups.modalities), dtype=torch.float64, device=device)
        self.window_count = 0
        self.held: int | None = None  # index of the held modality
        self.hold_left = 0
        self.holds = [0] * len(groups.modalities)  # how many holds each modality got (for logging)
        self.held_params: set[int] = set()
        self._last_d: list[float] | None = None

    def backward(self, step, total):
        groups = self.groups
        # a plain backward; gradients are reduced over ranks (DDP / a process group: all-reduces overlapped with
        # the backward) before their norms, and FSDP2's backward reduce-scatters them into the local shards
        groups.backward_reduced(total)
        self.epoch = step.epoch
        self.held_params = set()
        if self.hold_left > 0:
            for layout in groups.encoder_layouts[groups.modalities[self.held]]:
                for p in layout.params:
                    p.grad = None
                    self.held_params.add(id(p))
            self.hold_left -= 1
            return
        sq = torch.zeros(len(groups.modalities), 2, dtype=torch.float64)
        for u, m in enumerate(groups.modalities):
            params = [p for layout in groups.encoder_layouts[m] for p in layout.params]
            grads = [_local(p.grad) for p in params if p.grad is not None]
            sq[u] = sq_norm_sums(grads, [_local(p.detach()) for p in params])
            # every |g| element <= the gradients' joint 2-norm (under FSDP2: the local shards', before the all-reduce)
            self.proven.append((params, sq[u, :1].sqrt()))
        if groups.fsdp:
            groups.all_reduce_(summed=[sq])  # shard-local partial sums: one tiny [M, 2] collective
        sq = sq.to(self.speeds.device)
        self.speeds += torch.where(sq[:, 1] > 0, sq[:, 0] / sq[:, 1], torch.zeros_like(sq[:, 0]))
        self.window_count += 1
        if self.window_steps is not None and self.window_count % self.window_steps == 0:
            self._end_window()

    def end_epoch(self, epoch):
        if self.window_steps is None:
            self.epoch = epoch - 1  # the epoch that just ended
            self._end_window()

    def _end_window(self):
        s = self.speeds
        if self.window_count > 0 and self.epoch >= self.start_epoch and bool((s > 0).all()):
            logs = torch.log10(s)
            d = logs - logs.mean()
            self._last_d = d.tolist()
            if float(d.max() - d.min()) > self.threshold:
                self.held = int(torch.argmax(d))
                self.hold_left = self.hold_steps
                self.holds[self.held] += 1
        if not self.cumulative:
            self.speeds.zero_()
            self.window_count = 0

    def stats(self):
        out = {f"{m}/holds": float(h) for m, h in zip(self.groups.modalities, self.holds)}
        if self._last_d is not None:
            out.update({f"{m}/speed_log_ratio": v for m, v in zip(self.groups.modalities, self._last_d)})
        return out

    def state_dict(self):
        return {
            "speeds": self.speeds.clone(),
            "window_count": self.window_count,
            "held": self.held,
            "epoch": self.epoch,
            "hold_left": self.hold_left,
            "holds": list(self.holds),
        }

    def load_state_dict(self, state):
        M = len(self.groups.modalities)
        speeds, held, holds = state.get("speeds"), state.get("held"), state.get("holds")
        if not isinstance(speeds, torch.Tensor) or speeds.shape != (M,):
            raise ValueError(
                f"the greedy state holds speeds for {getattr(speeds, 'shape', None)} modalities, this Balancer has {M}"
            )
        if held is not None and not (isinstance(held, int) and 0 <= held < M):
            raise ValueError(f"the greedy state's held modality {held!r} is not an index below {M}")
        if not isinstance(holds, (list, tuple)) or len(holds) != M:
            raise ValueError(f"the greedy state's holds must list {M} counts, got {holds!r}")
        window_count, hold_left = int(state["window_count"]), int(state["hold_left"])
        epoch = state.get("epoch", 0)
        if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
            raise ValueError(f"the greedy state's epoch must be an int >= 0, got {epoch!r}")
        self.speeds.copy_(speeds.to(self.speeds.device))
        self.epoch = epoch
        self.window_count, self.held, self.hold_left, self.holds = window_count, held, hold_left, list(holds)


def _local(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of an FSDP2 DTensor; a plain tensor as it is."""
    return t.to_local() if hasattr(t, "to_local") else t
