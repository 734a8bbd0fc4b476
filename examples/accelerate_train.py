"""Sorted training of the digits nest with Hugging Face Accelerate.

    # 2 CPU processes (gloo). NB: `accelerate launch --num_processes 2 --cpu` starts ONE
    # process in accelerate 1.15 (its multi-CPU launch needs mpirun and --mpirun_hostfile)
    ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 examples/accelerate_train.py
    ACCELERATE_USE_CPU=1 torchrun --standalone --nproc_per_node 2 examples/accelerate_train.py   # same
    accelerate launch --multi_gpu --num_processes 8 examples/accelerate_train.py               # 8 GPUs
    python examples/accelerate_train.py                                                         # one process

``accelerator.prepare`` wraps the model in DDP when there are several
processes; ``sortednet.distributed.accumulate(..., module=model)`` runs every
sub-model's backward under ``no_sync`` and averages all gradients once per
step. Every process draws the same sub-models from ``Sampler(seed).draw(step)``.
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.nn.functional as F

try:
    from accelerate import Accelerator
except ImportError as e:  # (an optional extra)
    raise SystemExit(f"this example needs accelerate: pip install 'sortednet[accelerate]' ({e})") from e
from train_digits import DigitsMLP, build, load_data  # the same model and data as the single-process example

import sortednet as sn
import sortednet.distributed as snd
from sortednet.train import evaluate


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch", type=int, default=128, help="global batch (split over the processes)")
    p.add_argument("--k", type=int, default=4, help="sub-models per step")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=os.path.join("runs", "accelerate_digits.safetensors"))
    args = p.parse_args(argv)
    if args.steps < 1 or args.batch < 1 or args.k < 1:
        p.error(f"--steps, --batch and --k must be at least 1, got {args.steps}, {args.batch} and {args.k}")

    accelerator = Accelerator()
    rank, world = accelerator.process_index, accelerator.num_processes
    if args.batch % world:
        raise SystemExit(f"--batch {args.batch} must be divisible by the number of processes {world}")
    torch.manual_seed(args.seed)
    nest = build()                                    # wrap BEFORE prepare
    model, opt = accelerator.prepare(nest.model, torch.optim.Adam(nest.model.parameters(), lr=3e-3))
    sampler = sn.Sampler(nest.submodels, k=args.k, strategy="sandwich", seed=args.seed)
    xtr, ytr, xte, yte = load_data()
    per_rank = args.batch // world

    for step in range(args.steps):
        g = torch.Generator().manual_seed(args.seed * 100_003 + step)   # the same global batch everywhere
        idx = torch.randint(0, len(xtr), (args.batch,), generator=g)[rank * per_rank:(rank + 1) * per_rank]
        x, y = xtr[idx].to(accelerator.device), ytr[idx].to(accelerator.device)
        losses = snd.accumulate(nest, sampler.draw(step), lambda: F.cross_entropy(model(x), y),  # noqa: B023
                                module=model, backward=accelerator.backward)  # (its loss scaling, mixed precision)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if (step + 1) % 100 == 0:
            accelerator.print(f"step {step + 1}: process-0 losses {[round(v, 3) for v in losses]}")

    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    snd.save(nest, args.out)                          # collective; process 0 writes
    if accelerator.is_main_process:
        single = sn.load(DigitsMLP(), args.out)
        scores = evaluate(single, (xte, yte))
        for sub in (single.smallest, single.largest):
            print(f"{str(sub):<22} {single.cost(sub):>6,} params  test accuracy {100 * scores[sub]:.1f}%")
        print(f"{world} process{'es' if world > 1 else ''}; checkpoint: {args.out}")
    accelerator.wait_for_everyone()                   # every process leaves together: one tearing the process
    accelerator.end_training()                        # group down while another still evaluates can hang it


if __name__ == "__main__":
    main()
