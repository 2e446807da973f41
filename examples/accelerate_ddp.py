"""The Balancer with HF Accelerate: `accelerator.prepare` wraps the model in DDP (CPU, gloo, 2 processes).

    torchrun --nproc_per_node 2 examples/accelerate_ddp.py --methods calibrated

(`accelerate launch --cpu` starts several CPU processes only through MPI; torchrun is the launcher Accelerate
documents for plain multi-process runs, and it reads the same environment.) The model is the reference trainer's
late-fusion network (modfuse.train.models.LateFusionNet) on random data. --out writes, per method and rank, the
sample indices of each step, the last step's gradients and the final parameters (tests/test_integrations.py
compares them with one process on the concatenated batches).
"""

from __future__ import annotations

import argparse
from datetime import timedelta

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs

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


def train(method="calibrated", steps=3, batch_size=8, dtype=torch.float32, on_step=None, **options):
    # [readme: accelerate]
    accelerator = Accelerator(
        cpu=True, kwargs_handlers=[InitProcessGroupKwargs(backend="gloo", timeout=timedelta(seconds=60))]
    )
    net = make_net().to(dtype)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    loader = torch.utils.data.DataLoader(make_data(), batch_size=batch_size)
    model, optimizer, loader = accelerator.prepare(net, optimizer, loader)  # model: DDP(net) on 2 processes
    # The Balancer is given the wrapped model; the groups are the plain model's modules.
    balancer = modfuse.Balancer(model, encoders=dict(net.enc), shared=net.head, method=method, **options)
    for _step, (index, audio, video, y) in zip(range(steps), loader):
        fused, unimodal = model({"audio": audio.to(dtype), "video": video.to(dtype)})
        optimizer.zero_grad()
        if balancer.backward(
            fused=F.cross_entropy(fused, y, reduction="none"),  # instead of accelerator.backward
            unimodal={m: F.cross_entropy(v, y, reduction="none") for m, v in unimodal.items()},
            logits=unimodal,
            target=y,
        ):
            optimizer.step()
        # [/readme: accelerate]
        if on_step is not None:
            on_step(index, net)
    return accelerator, net, balancer


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", default="calibrated", help="comma-separated; one run each, in this order")
    parser.add_argument("--microbatches", type=int, help="calibrated's microbatches (per rank)")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--double", action="store_true", help="float64 model and inputs")
    parser.add_argument("--out", help="write each method's record of this rank to OUT.<method>.<rank>")
    args = parser.parse_args(argv)
    for method in args.methods.split(","):
        options = {"microbatches": args.microbatches} if args.microbatches and method == "calibrated" else {}
        indices, grads = [], {}

        def record(index, net, indices=indices, grads=grads):
            indices.append(index.tolist())
            grads.update({n: None if p.grad is None else p.grad.detach().clone() for n, p in net.named_parameters()})

        accelerator, net, balancer = train(
            method, args.steps, dtype=torch.float64 if args.double else torch.float32, on_step=record, **options
        )
        if args.out:
            params = {n: p.detach().clone() for n, p in net.named_parameters()}
            torch.save(
                {"indices": indices, "grads": grads, "params": params, "world": accelerator.num_processes},
                f"{args.out}.{method}.{accelerator.process_index}",
            )
        print(f"rank {accelerator.process_index}: {method}, {len(indices)} steps, stats {balancer.stats()}")
    accelerator.end_training()


if __name__ == "__main__":
    main()
