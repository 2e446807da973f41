"""The Balancer in PyTorch Lightning: manual optimization under the DDP strategy (CPU, gloo, 2 processes).

    python examples/lightning_ddp.py --methods calibrated          # Lightning starts the 2 processes itself
    torchrun --nproc_per_node 2 examples/lightning_ddp.py ...      # or any launcher Lightning supports

The model is the reference trainer's late-fusion network (modfuse.train.models.LateFusionNet) on random data.
--out writes, per method and rank, the sample indices of each step, the last step's gradients and the final parameters
(tests/test_integrations.py compares them with one process on the concatenated batches).
"""

from __future__ import annotations

import argparse
from datetime import timedelta

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.strategies import DDPStrategy

import modfuse
from modfuse.train.models import LateFusionNet

SHAPES = {"audio": (5,), "video": (7,)}
CLASSES = 3


def make_net(seed: int = 0) -> LateFusionNet:
    torch.manual_seed(seed)
    return LateFusionNet(SHAPES, CLASSES, hidden=16)


def make_data(samples: int = 64, seed: int = 1) -> torch.utils.data.TensorDataset:
    g = torch.Generator().manual_seed(seed)
    xs = [torch.randn(samples, *s, generator=g) for s in SHAPES.values()]
    return torch.utils.data.TensorDataset(
        torch.arange(samples), *xs, torch.randint(0, CLASSES, (samples,), generator=g)
    )


# [readme: lightning]
class BalancedModule(L.LightningModule):
    def __init__(self, net, method="calibrated", lr=0.1, **options):
        super().__init__()
        self.net, self.method, self.options, self.lr = net, method, options, lr
        self.automatic_optimization = False  # Balancer.backward replaces manual_backward

    def on_train_start(self):
        # Built once the strategy has wrapped the model: the Balancer is given the wrapper (DDP here).
        self.balancer = modfuse.Balancer(
            self.trainer.strategy.model,
            encoders=dict(self.net.enc),
            shared=self.net.head,
            method=self.method,
            **self.options,
        )

    def training_step(self, batch, batch_idx):
        _, audio, video, y = batch  # (sample index, inputs, labels)
        fused, unimodal = self.net({"audio": audio, "video": video})
        optimizer = self.optimizers()
        optimizer.zero_grad()
        if self.balancer.backward(
            fused=F.cross_entropy(fused, y, reduction="none"),
            unimodal={m: F.cross_entropy(v, y, reduction="none") for m, v in unimodal.items()},
            logits=unimodal,
            target=y,
        ):
            optimizer.step()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def fit(method="calibrated", steps=3, batch_size=8, precision="32-true", callbacks=(), **options):
    module = BalancedModule(make_net(), method, **options)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=2,
        max_steps=steps,
        precision=precision,
        callbacks=list(callbacks),
        strategy=DDPStrategy(process_group_backend="gloo", timeout=timedelta(seconds=60)),
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
    )
    trainer.fit(module, torch.utils.data.DataLoader(make_data(), batch_size=batch_size))
    return trainer, module


# [/readme: lightning]


class Record(L.Callback):
    """What tests/test_integrations.py compares: each step's sample indices, the last gradients, the parameters."""

    def __init__(self):
        self.indices, self.grads = [], {}

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.indices.append(batch[0].tolist())
        self.grads = {n: None if p.grad is None else p.grad.detach().clone() for n, p in module.net.named_parameters()}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", default="calibrated", help="comma-separated; one fit each, in this order")
    parser.add_argument("--microbatches", type=int, help="calibrated's microbatches (per rank)")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--precision", default="32-true")
    parser.add_argument("--out", help="write each method's record of this rank to OUT.<method>.<rank>")
    args = parser.parse_args(argv)
    for method in args.methods.split(","):
        options = {"microbatches": args.microbatches} if args.microbatches and method == "calibrated" else {}
        record = Record()
        # (a second fit in the same processes reuses them: Lightning launches the other process only once)
        trainer, module = fit(method, args.steps, precision=args.precision, callbacks=[record], **options)
        if args.out:
            params = {n: p.detach().clone() for n, p in module.net.named_parameters()}
            torch.save(
                {"indices": record.indices, "grads": record.grads, "params": params, "world": trainer.world_size},
                f"{args.out}.{method}.{trainer.global_rank}",
            )
        print(f"rank {trainer.global_rank}: {method}, {trainer.global_step} steps, stats {module.balancer.stats()}")


if __name__ == "__main__":
    main()
