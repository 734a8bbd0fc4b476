"""How much accuracy BatchNorm recalibration recovers for small sub-models.

A small CNN with BatchNorm (digits, 8x8) is trained once with sorted
training (sandwich sampler: smallest + largest + random each step), so its
shared BatchNorm running statistics are a mix of every sub-model's. Each
sub-model is then scored on the held-out split with the shared statistics
and after ``nest.calibrate`` (per-sub-model statistics from 10 training
batches), live and exported (which must agree).

    python benchmarks/calibration.py [--quick] [--seeds 0 1 2]

Writes benchmarks/results/calibration.md (``--quick``: calibration_quick.md).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import platform
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import table, write  # noqa: E402

import sortednet as sn  # noqa: E402
from sortednet.train import evaluate  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location("train_digits", os.path.join(ROOT, "examples", "train_digits.py"))
demo = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(demo)

C1, C2 = (4, 8, 16, 32), (8, 16, 32, 64)


class BNDigitsCNN(nn.Module):
    """8x8 image -> conv-BN(c1) -> maxpool -> conv-BN(c2) -> global average -> 10 classes."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(1, C1[-1], 3, padding=1), nn.BatchNorm2d(C1[-1])
        self.conv2, self.bn2 = nn.Conv2d(C1[-1], C2[-1], 3, padding=1), nn.BatchNorm2d(C2[-1])
        self.head = nn.Linear(C2[-1], 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x.view(-1, 1, 8, 8)))), 2)
        return self.head(F.relu(self.bn2(self.conv2(x))).mean((2, 3)))


def build() -> sn.Nest:
    return sn.wrap(BNDigitsCNN(), sn.Width("c1", list(C1), out="conv1", norm="bn1", inp="conv2"),
                   sn.Width("c2", list(C2), out="conv2", norm="bn2", inp="head"))


def run(seed: int, steps: int, data) -> dict:
    xtr, ytr, xte, yte = data
    torch.manual_seed(seed)
    nest = build()
    sampler = sn.Sampler(nest.submodels, k=3, strategy="sandwich", seed=seed)
    opt = torch.optim.Adam(nest.trainable_parameters(), lr=3e-3)
    loader = demo.Batches(xtr, ytr, 64, seed=seed)
    it = iter(())
    nest.model.train()
    for step in range(steps):
        try:
            x, y = next(it)
        except StopIteration:
            it = iter(loader)
            x, y = next(it)
        sn.accumulate(nest, sampler.draw(step), lambda x=x, y=y: F.cross_entropy(nest.model(x), y))
        opt.step()
        opt.zero_grad(set_to_none=True)
    shared = evaluate(nest, (xte, yte))
    t0 = time.perf_counter()
    nest.calibrate(demo.Batches(xtr, ytr, 64, seed=seed + 100), batches=10)
    cal_s = time.perf_counter() - t0
    calibrated = evaluate(nest, (xte, yte))
    exported = {}
    for s in nest.submodels:
        m = nest.export(s).eval()
        with torch.no_grad():
            exported[s] = (m(xte).argmax(1) == yte).float().mean().item()
    return {"shared": shared, "calibrated": calibrated, "exported": exported, "cal_s": cal_s,
            "params": {s: nest.cost(s) for s in nest.submodels}, "subs": nest.submodels}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    ap.add_argument("--quick", action="store_true", help="few steps, seed 0 unless --seeds (smoke test)")
    ap.add_argument("--seeds", type=int, nargs="+", default=None, help="default: 0 1 2 (--quick: 0)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    seeds = args.seeds or ([0] if args.quick else [0, 1, 2])
    steps = 100 if args.quick else 1200
    data = demo.load_data()
    runs = []
    for seed in seeds:
        runs.append(run(seed, steps, data))
        print(f"seed {seed} done", flush=True)
    subs = runs[0]["subs"]
    mean = lambda key, s: statistics.mean(r[key][s] for r in runs)  # noqa: E731
    rows, gains = [], []
    for s in subs:
        gain = mean("calibrated", s) - mean("shared", s)
        gains.append((s, gain))
        rows.append([f"`{s}`", runs[0]["params"][s], f"{100 * mean('shared', s):.1f}",
                     f"{100 * mean('calibrated', s):.1f}", f"{100 * gain:+.1f}", f"{100 * mean('exported', s):.1f}"])
    small = [g for s, g in gains if runs[0]["params"][s] < sorted(runs[0]["params"].values())[len(subs) // 4]]
    worst_export = max(abs(r["exported"][s] - r["calibrated"][s]) for r in runs for s in subs)
    text = (f"# BatchNorm calibration on digits\n\nCommand: `python benchmarks/calibration.py"
            f"{' --quick' if args.quick else ''}`; torch {torch.__version__}, {platform.machine()}, 1 thread. "
            f"CNN conv-BN(c1 in {list(C1)}) -> conv-BN(c2 in {list(C2)}), {len(subs)} sub-models, trained "
            f"{steps} steps with the sandwich sampler (k=3, Adam 3e-3, batch 64); seeds {seeds}; test accuracy "
            "(%) on the held-out 20% (360 images), mean over seeds. 'shared': the running statistics "
            "accumulated during training (shared prefixes); 'calibrated': after `nest.calibrate(train batches, "
            f"batches=10)` ({statistics.mean(r['cal_s'] for r in runs):.2f} s for all sub-models); "
            "'exported': `nest.export(sub)` after calibration.\n\n"
            f"Mean gain over the smallest quarter of sub-models (by params): {100 * statistics.mean(small):+.1f} "
            f"points; over all: {100 * statistics.mean(g for _, g in gains):+.1f} points. Largest "
            f"|exported - live| accuracy difference: {100 * worst_export:.2f} points.\n\n"
            + table(["sub-model", "params", "shared", "calibrated", "gain", "exported"], rows) + "\n")
    print(text)
    print("wrote", write("calibration_quick.md" if args.quick else "calibration.md", text))


if __name__ == "__main__":
    main()
