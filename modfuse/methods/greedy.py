"""Method "greedy": hold back the encoder that learns fastest (balanced learning speeds).

Source: Wu, Jastrzebski, Cho, Geras, "Characterizing and Overcoming the Greedy Nature of Learning in Multi-modal
Deep Neural Networks", ICML 2022 (nyukat/greedy_multimodal_learning), generalised from their MMTM model to any
per-modality encoders as SPEC.md states.

Learning speed of encoder m, accumulated each step over a window (default: one epoch, or window_steps steps):
    s_m += ||g_m||^2 / ||theta_m||^2          (over all of encoder m's parameters)
At the window's end d_m = log10 s_m - mean_j log10 s_j; when max_m d_m - min_m d_m > threshold (0.3; the paper's
0.01 fires on every check), the fastest encoder is held for hold_steps (5) steps, then the speeds restart.
Holding sets its parameters' `.grad` to None, so the optimizer leaves them alone (a zeroed gradient would still
move them through Adam's momentum). Steps while an encoder is held do not add to the speeds.

This differs from the paper's own rebalancing, which replaces the MMTM excitations by their running average
during a "re-balancing" phase; that needs their architecture, this works on any encoders.
Fused ops: one Op 1 launch per encoder gives the squared norms of every gradient and parameter tensor (the
gradients sit in row 0 of a flat bank, the parameters are copied into row 1).
"""
from __future__ import annotations

import torch

from modfuse import ops
from modfuse.methods import Method, reduce_encoder_banks, register


@register
class Greedy(Method):
    name = "greedy"
    requires = ()
    modulates_encoders = True
    plain_gradients = False
    fsdp2 = False

    def __init__(self, groups, threshold: float = 0.3, hold_steps: int = 5, window_steps: int | None = None):
        super().__init__(groups)
        if len(groups.modalities) < 2:
            raise ValueError("method 'greedy' needs at least two modalities")
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not threshold >= 0:
            raise ValueError(f"threshold must be >= 0, got {threshold!r}")
        if not isinstance(hold_steps, int) or hold_steps < 1:
            raise ValueError(f"hold_steps must be an int >= 1, got {hold_steps!r}")
        if window_steps is not None and (not isinstance(window_steps, int) or window_steps < 1):
            raise ValueError(f"window_steps must be None (one epoch) or an int >= 1, got {window_steps!r}")
        self.threshold, self.hold_steps, self.window_steps = threshold, hold_steps, window_steps
        device = groups.trainable[0].device
        self.speeds = torch.zeros(len(groups.modalities), dtype=torch.float64, device=device)
        self.window_count = 0
        self.held: int | None = None    # index of the held modality
        self.hold_left = 0
        self.holds = [0] * len(groups.modalities)  # how many holds each modality got (for logging)
        self.held_params: set[int] = set()
        self._last_d: list[float] | None = None

    def backward(self, step, total):
        banks = reduce_encoder_banks(self.groups, total, rows=2)
        self.held_params = set()
        if self.hold_left > 0:
            for layout, _ in banks[self.groups.modalities[self.held]]:
                for p in layout.params:
                    p.grad = None
                    self.held_params.add(id(p))
            self.hold_left -= 1
            return
        for u, m in enumerate(self.groups.modalities):
            sq = torch.zeros(2, dtype=torch.float64, device=self.speeds.device)
            for layout, buf in banks[m]:
                torch._foreach_copy_(layout.views(buf[1]), [p.detach() for p in layout.params])
                # one launch: squared norms of every gradient (row 0) and parameter (row 1) tensor
                sq += ops.segment_sq_norms(buf, layout.offsets).sum(1).double().to(sq.device)
            self.speeds[u] += torch.where(sq[1] > 0, sq[0] / sq[1], torch.zeros_like(sq[0]))
        self.window_count += 1
        if self.window_steps is not None and self.window_count >= self.window_steps:
            self._end_window()

    def end_epoch(self, epoch):
        if self.window_steps is None:
            self._end_window()

    def _end_window(self):
        s = self.speeds
        if self.window_count > 0 and bool((s > 0).all()):
            logs = torch.log10(s)
            d = logs - logs.mean()
            self._last_d = d.tolist()
            if float(d.max() - d.min()) > self.threshold:
                self.held = int(torch.argmax(d))
                self.hold_left = self.hold_steps
                self.holds[self.held] += 1
        self.speeds.zero_()
        self.window_count = 0

    def stats(self):
        out = {f"{m}/holds": float(h) for m, h in zip(self.groups.modalities, self.holds)}
        if self._last_d is not None:
            out.update({f"{m}/speed_log_ratio": v for m, v in zip(self.groups.modalities, self._last_d)})
        return out

    def state_dict(self):
        return {"speeds": self.speeds.clone(), "window_count": self.window_count, "held": self.held,
                "hold_left": self.hold_left, "holds": list(self.holds)}

    def load_state_dict(self, state):
        M = len(self.groups.modalities)
        speeds, held, holds = state.get("speeds"), state.get("held"), state.get("holds")
        if not isinstance(speeds, torch.Tensor) or speeds.shape != (M,):
            raise ValueError(f"the greedy state holds speeds for {getattr(speeds, 'shape', None)} modalities, this "
                             f"Balancer has {M}")
        if held is not None and not (isinstance(held, int) and 0 <= held < M):
            raise ValueError(f"the greedy state's held modality {held!r} is not an index below {M}")
        if not isinstance(holds, (list, tuple)) or len(holds) != M:
            raise ValueError(f"the greedy state's holds must list {M} counts, got {holds!r}")
        window_count, hold_left = int(state["window_count"]), int(state["hold_left"])
        self.speeds.copy_(speeds.to(self.speeds.device))
        self.window_count, self.held, self.hold_left, self.holds = window_count, held, hold_left, list(holds)

