"""Sorted training of the digits nest (examples/train_digits.py) on several
processes with DDP, or FSDP2 with ``--fsdp``, launched by torchrun.

    # one machine, 2 processes (CPU: gloo; one GPU per process: nccl)
    torchrun --standalone --nproc_per_node 2 examples/ddp_train.py --steps 300

    # several machines: run on EVERY node, NODE_RANK = 0, 1, ...; HOST:PORT is node 0
    torchrun --nnodes 2 --nproc_per_node 8 --node_rank $NODE_RANK \\
        --rdzv_backend c10d --rdzv_endpoint HOST:29500 --rdzv_id digits \\
        examples/ddp_train.py --steps 300

Every rank draws the same sub-models from ``Sampler(seed).draw(step)`` and
trains them on its own shard of the global batch;
``sortednet.distributed.accumulate`` runs the backwards without DDP's
reducer and averages all gradients in one all-reduce per step. Rank 0 writes
a checkpoint that ``sn.load`` opens in one process, evaluates every sub-model
on the test split and prints the smallest, a middle and the largest.
"""

from __future__ import annotations

import argparse
import gc
import os
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from train_digits import DigitsMLP, build, load_data  # the same model and data as the single-process example

import sortednet as sn
import sortednet.distributed as snd
from sortednet.train import evaluate


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch", type=int, default=128, help="global batch (split over the ranks)")
    p.add_argument("--k", type=int, default=4, help="sub-models per step")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fsdp", action="store_true", help="shard with FSDP2 fully_shard instead of DDP")
    p.add_argument("--out", default=os.path.join("runs", "ddp_digits.safetensors"))
    args = p.parse_args(argv)
    if args.steps < 1 or args.batch < 1 or args.k < 1:
        p.error(f"--steps, --batch and --k must be at least 1, got {args.steps}, {args.batch} and {args.k}")

    if "RANK" not in os.environ:
        raise SystemExit("ddp_train.py runs under torchrun, e.g. `torchrun --standalone --nproc_per_node 2 "
                         "examples/ddp_train.py`; one process without torchrun: examples/train_digits.py")
    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if args.batch % world:
        raise SystemExit(f"--batch {args.batch} must be divisible by the number of processes {world}")

    torch.manual_seed(args.seed)                 # the same initial weights on every rank
    nest = build()                               # wrap BEFORE DDP / fully_shard
    model = nest.model.to(device)
    if args.fsdp:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        module = fully_shard(model, mesh=init_device_mesh(device.type, (world,)))
    else:
        module = DDP(model, device_ids=[device.index] if cuda else None)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    sampler = sn.Sampler(nest.submodels, k=args.k, strategy="sandwich", seed=args.seed)
    xtr, ytr, xte, yte = load_data()
    per_rank = args.batch // world

    t0 = time.perf_counter()
    for step in range(args.steps):
        g = torch.Generator().manual_seed(args.seed * 100_003 + step)    # the same global batch everywhere
        idx = torch.randint(0, len(xtr), (args.batch,), generator=g)[rank * per_rank:(rank + 1) * per_rank]
        x, y = xtr[idx].to(device), ytr[idx].to(device)
        losses = snd.accumulate(nest, sampler.draw(step), lambda: F.cross_entropy(module(x), y),  # noqa: B023
                                  module=module)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if rank == 0 and (step + 1) % 100 == 0:
            print(f"step {step + 1}: rank-0 losses {[round(v, 3) for v in losses]}", flush=True)
    if rank == 0:
        print(f"{args.steps} steps on {world} processes in {time.perf_counter() - t0:.1f} s")

    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    snd.save(nest, args.out)                      # collective; rank 0 writes
    if rank == 0:
        single = sn.load(DigitsMLP(), args.out)     # one process, no DDP: what deployment sees
        scores = evaluate(single, (xte, yte))
        for sub in (single.smallest, single.submodels[len(single.submodels) // 2], single.largest):
            print(f"{str(sub):<22} {single.cost(sub):>6,} params  test accuracy {100 * scores[sub]:.1f}%")
        print(f"checkpoint: {args.out} ({len(single.submodels)} sub-models)")
    # everything that holds the process group is freed now, while every rank is still here: the DDP wrapper, and
    # under FSDP2 the sharded model itself (fully_shard returns the same object: its DTensors and device mesh).
    # Freed at interpreter exit, after destroy_process_group and the other rank's exit, gloo's teardown hung at
    # times under DDP and aborted ("terminate called without an active exception") under FSDP2
    module = opt = model = nest = sampler = None
    gc.collect()
    dist.barrier()                                # every rank leaves together (no rank tears down mid-evaluation)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
