"""Train 160 nested sub-models of ONE small network on sklearn digits, then
pick sub-models by parameter budget.

    python examples/train_digits.py            # well under a minute on one CPU core

One MLP (64 -> h1 -> h2 -> depth residual blocks of width h2 -> 10) nests
along three dimensions: h1 (8 sizes) x h2 (5 sizes) x depth (4 sizes) = 160
sub-models that share its weights. Each optimizer step trains k of them
(sorted probabilistic training); at the end every sub-model is evaluated, a
summary is printed and the full table is written to a markdown file.
"""

from __future__ import annotations

import argparse
import math
import os
import time

import torch
import torch.nn.functional as F
from torch import nn

import sortednet as sn
from sortednet.train import evaluate

H1 = (8, 16, 24, 32, 48, 64, 96, 128)
H2 = (8, 16, 32, 48, 64)
DEPTH = (1, 2, 3, 4)


class DigitsMLP(nn.Module):
    """64 pixels -> h1 -> h2 -> ``depth`` residual blocks (h2 -> h2) -> 10 classes."""

    def __init__(self, h1: int = H1[-1], h2: int = H2[-1], depth: int = DEPTH[-1]) -> None:
        super().__init__()
        self.inp, self.mid = nn.Linear(64, h1), nn.Linear(h1, h2)
        self.blocks = nn.ModuleList(nn.Linear(h2, h2) for _ in range(depth))
        self.head = nn.Linear(h2, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.mid(F.relu(self.inp(x))))
        for block in self.blocks:
            x = x + F.relu(block(x))
        return self.head(x)


def build(h1: tuple[int, ...] = H1, h2: tuple[int, ...] = H2, depth: tuple[int, ...] = DEPTH) -> sn.Nest:
    """A fresh DigitsMLP wrapped with the three nested dimensions."""
    model = DigitsMLP(h1[-1], h2[-1], depth[-1])
    return sn.wrap(model,
                   sn.Width("h1", list(h1), out="inp", inp="mid"),
                   sn.Width("h2", list(h2), out=["mid", "blocks.*"], inp=["blocks.*", "head"]),
                   sn.Depth("depth", list(depth), layers="blocks"))


def load_data() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """sklearn digits, a fixed stratified 80/20 split, pixels scaled to [0, 1]."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:  # (an optional extra)
        raise SystemExit(f"this example needs scikit-learn: pip install 'sortednet[data]' ({e})") from e
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    xtr, xte, ytr, yte = train_test_split(x, y, test_size=0.2, random_state=0, stratify=y)
    f = lambda a: torch.tensor(a / 16.0, dtype=torch.float32)
    return f(xtr), torch.tensor(ytr), f(xte), torch.tensor(yte)


class Batches:
    """Shuffled mini-batches, a fresh permutation per epoch from a seeded generator."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch_size: int = 64, seed: int = 0) -> None:
        self.x, self.y, self.bs = x, y, batch_size
        self.gen = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return math.ceil(len(self.x) / self.bs)

    def __iter__(self):
        perm = torch.randperm(len(self.x), generator=self.gen)
        for i in range(0, len(perm), self.bs):
            idx = perm[i:i + self.bs]
            yield self.x[idx], self.y[idx]


def report(nest: sn.Nest, scores: dict, path: str) -> None:
    """Print a compact accuracy grid (rows: depth, h2; columns: h1) and write every sub-model to ``path``."""
    subs = nest.submodels
    acc = {(s["depth"], s["h2"], s["h1"]): scores[s] for s in subs}
    h1s = sorted({s["h1"] for s in subs})
    print(f"\nTest accuracy (%) of all {len(subs)} sub-models; rows depth x h2, columns h1:")
    print("depth  h2 | " + " ".join(f"{h:>5}" for h in h1s))
    print("-" * (12 + 6 * len(h1s)))
    for d, h2 in sorted({(k[0], k[1]) for k in acc}):
        print(f"{d:>5} {h2:>3} | " + " ".join(f"{100 * acc[(d, h2, h)]:5.1f}" for h in h1s))
    vals = list(scores.values())
    costs = [nest.cost(s, "params") for s in subs]
    print(f"\nparameters {min(costs):,} .. {max(costs):,}; accuracy min {100 * min(vals):.1f}%, "
          f"mean {100 * sum(vals) / len(vals):.1f}%, max {100 * max(vals):.1f}%")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        f.write("| sub-model | params | test accuracy |\n| --- | ---: | ---: |\n")
        for s, c in zip(subs, costs):
            f.write(f"| {s} | {c:,} | {100 * scores[s]:.2f}% |\n")
    print(f"full table ({len(subs)} rows): {path}")


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    p.add_argument("--epochs", type=int, default=65)
    p.add_argument("--k", type=int, default=4, help="sub-models trained per optimizer step (not with --strategy all)")
    p.add_argument("--strategy", default="sandwich", choices=["uniform", "sandwich", "weighted", "all"])
    p.add_argument("--distill", action="store_true", help="in-place distillation from the largest drawn sub-model")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--table", default=os.path.join("runs", "train_digits_submodels.md"))
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    args.table = os.path.expanduser(args.table)
    made: list[str] = []
    try:  # (said before training, not after it: the file is opened for writing once here, then left as it was)
        if not args.table or args.table.endswith(os.sep) or os.path.isdir(args.table):
            raise IsADirectoryError(args.table)
        folder = os.path.dirname(os.path.abspath(args.table))
        while not os.path.lexists(folder):
            made.append(folder)
            folder = os.path.dirname(folder)
        existed = os.path.exists(args.table)  # (a link to a missing file: its target is made, then removed)
        os.makedirs(os.path.dirname(os.path.abspath(args.table)), exist_ok=True)
        open(args.table, "a").close()
        if not existed:
            os.remove(os.path.realpath(args.table))
    except OSError as e:
        for folder in made:  # (the folders made for the check, deepest first, whatever failed)
            if os.path.isdir(folder):
                os.rmdir(folder)
        p.error(f"--table {args.table!r} is no path a file can be written to ({type(e).__name__}): give the path "
                "of a file for the table")
    for folder in made:
        os.rmdir(folder)
    if args.epochs < 1 or args.k < 1:
        p.error(f"--epochs and --k must be at least 1, got {args.epochs} and {args.k}")
    torch.set_num_threads(1)  # tiny matrices: threads only add synchronisation
    torch.manual_seed(args.seed)
    xtr, ytr, xte, yte = load_data()
    n_val = len(xtr) // 8  # a validation slice of the training split scores sub-models for pick()
    (xva, yva), (xtr, ytr) = (xtr[:n_val], ytr[:n_val]), (xtr[n_val:], ytr[n_val:])
    nest = build()
    print(f"{nest}\n{len(nest.submodels)} sub-models share {nest.cost(nest.largest):,} parameters")
    k = None if args.strategy == "all" else args.k  # ("all": every sub-model each step)
    if k is not None and k > len(nest.submodels):
        p.error(f"--k {k} is more than the {len(nest.submodels)} sub-models of the nest")
    sampler = sn.Sampler(nest.submodels, k=k, strategy=args.strategy, seed=args.seed,
                         weights="large" if args.strategy == "weighted" else None)
    opt = torch.optim.Adam(nest.trainable_parameters(), lr=3e-3)
    loader = Batches(xtr, ytr, 64, seed=args.seed)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=args.epochs * len(loader))
    t0 = time.perf_counter()
    sn.fit(nest, loader, opt, sampler, epochs=args.epochs, scheduler=sched, progress=not args.quiet,
           distill=sn.Distill() if args.distill else None)
    print(f"trained {len(nest.submodels)} sub-models in {time.perf_counter() - t0:.0f} s "
          f"({args.epochs * len(loader)} steps x k={k or len(nest.submodels)}, strategy {args.strategy!r})")
    scores = evaluate(nest, (xte, yte))
    report(nest, scores, args.table)
    # profile: FLOPs per sub-model and its validation accuracy as the score; pick() then returns the
    # best-scoring sub-model within a budget by lookup on the Pareto front, without search
    val = evaluate(nest, (xva, yva))
    prof = nest.profile(xva[:1], score=lambda sub: val[sub], metrics=("params", "flops"), progress=False)
    full = nest.cost(nest.largest)
    print(f"\nBudget -> nest.pick(...) (best validation accuracy within the budget; "
          f"{len(prof.front('params'))} sub-models on the params Pareto front)")
    print(f"  {'budget':<22} {'picked sub-model':<22} {'params':>7} {'MFLOPs':>7} {'val %':>6} {'test %':>6}")
    budgets = [("params", full // 20), ("params", full // 5), ("params", full // 2),
               ("flops", nest.cost(nest.largest, "flops") // 4)]
    for metric, budget in budgets:
        sub = nest.pick(**{metric: budget})
        print(f"  {metric + ' <= ' + format(int(budget), ','):<22} {str(sub):<22} {nest.cost(sub):>7,} "
              f"{nest.cost(sub, 'flops') / 1e6:>7.3f} {100 * val[sub]:>6.1f} {100 * scores[sub]:>6.1f}")
    return {str(s): v for s, v in scores.items()}


if __name__ == "__main__":
    main()
