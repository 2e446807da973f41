"""Balanced multimodal training with `modfuse.Balancer`: a complete loop to copy. Runs in seconds on a CPU.

    python examples/balancer_quickstart.py                            # method "ogm_ge", alpha 0.8
    python examples/balancer_quickstart.py --method calibrated        # any name in modfuse.methods.names()
    python examples/balancer_quickstart.py --method utilization --option target=0.6

The data are synthetic, two modalities of one 4-class label: "audio" (8 features) is the easy one, "video" (32
features) is informative but noisier (ogm_ge's printed coefficients show audio being slowed down). The model is late fusion: an MLP encoder per
modality and one linear head applied to each embedding (unimodal logits) and to their mean (fused logits), so
every modality's objective reaches the head: the head is the Balancer's `shared` group.

What the loop shows:
- `encoders`, `unimodal` and `logits` are dicts keyed by modality name (the same names everywhere).
- Method options are keyword arguments of `Balancer(...)` (here from `--option key=value`).
- `balancer.backward(...)` replaces `loss.backward()`. Like it, it ADDS to `.grad`: zeroing the gradients is the
  caller's job (`optimizer.zero_grad()`), and leaving it out accumulates gradients over steps.
- It returns False when it skipped a step for a NaN/Inf loss: then do not call `optimizer.step()`.
- `balancer.end_epoch()` once per epoch (greedy's window, utilization's schedule, ogm_ge's active epochs), and
  `balancer.stats()` for logging (the method's statistics of the last step, a dict of floats).
"""

from __future__ import annotations

import argparse
import ast

import torch
import torch.nn.functional as F
from torch import nn

import modfuse

CLASSES = 4
# Methods that are defined on the unimodal losses (each modality's own objective). The others get only the fused
# loss here: passed unimodal losses are added to any method's objective (method "none" + unimodal losses is the
# fused+unimodal control a comparison needs).
NEEDS_UNIMODAL = ("calibrated", "mmpareto", "mimo", "inforeg")


def make_data(n: int, generator: torch.Generator) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Two views of one label: audio separates the classes well, video weakly (class signal 0.6 under unit noise)."""
    y = torch.randint(0, CLASSES, (n,), generator=generator)
    centres = {
        "audio": torch.randn(CLASSES, 8, generator=torch.Generator().manual_seed(1)) * 1.5,
        "video": torch.randn(CLASSES, 32, generator=torch.Generator().manual_seed(2)) * 0.6,
    }
    xs = {m: c[y] + torch.randn(n, c.shape[1], generator=generator) for m, c in centres.items()}
    return xs, y


class LateFusion(nn.Module):
    def __init__(self, dims: dict[str, int], hidden: int = 32):
        super().__init__()
        self.encoders = nn.ModuleDict({m: nn.Sequential(nn.Linear(d, hidden), nn.ReLU()) for m, d in dims.items()})
        self.head = nn.Linear(hidden, CLASSES)

    def forward(self, xs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(fused logits [N, C], modality -> unimodal logits [N, C])."""
        h = {m: enc(xs[m]) for m, enc in self.encoders.items()}
        self.features = h  # the embeddings, for the methods that read them (pmr, cggm)
        fused = self.head(torch.stack(list(h.values())).mean(0))
        return fused, {m: self.head(hm) for m, hm in h.items()}


@torch.no_grad()
def accuracies(model: LateFusion, xs, y) -> dict[str, float]:
    fused, unimodal = model(xs)
    out = {"fused": float((fused.argmax(1) == y).float().mean())}
    out.update({m: float((logits.argmax(1) == y).float().mean()) for m, logits in unimodal.items()})
    return out


def main(
    method: str = "ogm_ge", epochs: int = 8, options: dict | None = None, seed: int = 0, verbose: bool = True
) -> dict:
    """Train with `method`; returns the test accuracies and the Balancer's last statistics."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    train_x, train_y = make_data(768, g)
    test_x, test_y = make_data(512, g)
    model = LateFusion({m: x.shape[1] for m, x in train_x.items()})
    batch_size = 64
    steps_per_epoch = -(-train_y.shape[0] // batch_size)

    defaults = {
        "ogm_ge": {"alpha": 0.8},
        "utilization": {"target": 0.5, "warmup_epochs": 2, "steps_per_epoch": steps_per_epoch},
    }
    options = {**defaults.get(method, {}), **(options or {})}
    balancer = modfuse.Balancer(model, encoders=dict(model.encoders), shared=model.head, method=method, **options)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)

    for epoch in range(epochs):
        model.train()
        for idx in torch.randperm(train_y.shape[0], generator=g).split(batch_size):
            xs = {m: x[idx] for m, x in train_x.items()}
            y = train_y[idx]
            fused_logits, logits = model(xs)
            optimizer.zero_grad()  # Balancer.backward adds to .grad, as loss.backward() does
            # Everything a method may read; each method uses what it needs (README: "needs" column).
            step = {
                "fused": F.cross_entropy(fused_logits, y, reduction="none"),  # per-sample losses [N]
                "logits": logits,
                "fused_logits": fused_logits,
                "target": y,
                "forward": lambda d: model(d)[0],
                "inputs": xs,
                "features": model.features,
            }  # utilization re-runs the model
            if method in NEEDS_UNIMODAL:
                step["unimodal"] = {m: F.cross_entropy(lg, y, reduction="none") for m, lg in logits.items()}
            if balancer.backward(**step):  # False: a NaN/Inf loss, the step was skipped
                optimizer.step()
        balancer.end_epoch()
        model.eval()
        acc = accuracies(model, test_x, test_y)
        if verbose:
            stats = ", ".join(f"{k} {v:.3g}" for k, v in balancer.stats().items())
            print(
                f"epoch {epoch + 1}: test accuracy "
                + ", ".join(f"{k} {v:.3f}" for k, v in acc.items())
                + (f" | {stats}" if stats else "")
            )
    return {"accuracy": acc, "stats": balancer.stats()}


def _option(text: str) -> tuple[str, object]:
    key, _, value = text.partition("=")
    if not key or not value:
        raise argparse.ArgumentTypeError(f"--option takes key=value, got {text!r}")
    try:
        return key, ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return key, value  # a bare word, e.g. moments=per_sample


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", default="ogm_ge", choices=modfuse.methods.names())
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument(
        "--option",
        type=_option,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a method option, e.g. alpha=0.3 (ogm_ge) or moments=per_sample (calibrated)",
    )
    args = parser.parse_args()
    main(args.method, args.epochs, dict(args.option))
