"""Quality benchmark on sklearn digits: does one sorted training run give every
nested sub-model the accuracy it would reach if trained on its own?

    python benchmarks/digits.py --jobs 2        # 3 seeds, both architectures (~20-30 min on 2 busy cores)
    python benchmarks/digits.py --quick         # smoke test: 1 seed, few steps, writes under /tmp
    python benchmarks/digits.py --render        # re-render the markdown/plot/docs from digits.json

Architectures: the demo's MLP (h1 x h2 x depth = 160 sub-models, 1500 steps)
and a small CNN with two nested channel widths and BatchNorm (25 sub-models,
3000 steps: at 1500 even its standalone twins are not converged). Methods
share the optimizer (Adam + cosine schedule), batch order and number of
optimizer steps; they differ only in which sub-models each step trains.
BatchNorm statistics are recomputed after training for every method alike
(per sub-model with ``nest.calibrate``; each twin for itself). Writes
benchmarks/results/digits.{json,md,png} and digits_all_submodels.md, and the
summary table into docs/training.md between the ``digits`` markers.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import sortednet as sn
from sortednet.train import evaluate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location("train_digits", os.path.join(ROOT, "examples", "train_digits.py"))
demo = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(demo)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import digits_report as report  # noqa: E402

C1, C2 = (4, 8, 16, 24, 32), (8, 16, 32, 48, 64)


class DigitsCNN(nn.Module):
    """8x8 image -> conv(c1) -> BN -> maxpool -> conv(c2) -> BN -> global average -> 10 classes.

    BatchNorm (sliced with the channels, statistics recalibrated per sub-model
    after training, as in Slimmable / US-Nets) is part of the architecture, so
    the standalone twins have it too and are recalibrated the same way.
    """

    def __init__(self, c1: int = C1[-1], c2: int = C2[-1]) -> None:
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(1, c1, 3, padding=1), nn.Conv2d(c1, c2, 3, padding=1)
        self.bn1, self.bn2 = nn.BatchNorm2d(c1), nn.BatchNorm2d(c2)
        self.head = nn.Linear(c2, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x.view(-1, 1, 8, 8)))), 2)
        return self.head(F.relu(self.bn2(self.conv2(x))).mean((2, 3)))


@dataclass
class Arch:
    name: str
    build: Callable[[], sn.Nest]                 # a fresh nest
    plain: Callable[[sn.SubModel], nn.Module]    # a standalone model of one sub-model's size
    steps: int


ARCHS = {
    "mlp": Arch("MLP h1 x h2 x depth", demo.build,
                lambda s: demo.DigitsMLP(s["h1"], s["h2"], s["depth"]), 1500),
    "cnn": Arch("CNN c1 x c2 (BatchNorm)",
                lambda: sn.wrap(DigitsCNN(), sn.Width("c1", list(C1), out="conv1", norm="bn1", inp="conv2"),
                                sn.Width("c2", list(C2), out="conv2", norm="bn2", inp="head")),
                lambda s: DigitsCNN(s["c1"], s["c2"]), 3000),
}

K = 4
METHODS = {  # name -> sampler arguments (None: independent training of standalone twins)
    "sortednet uniform": {"strategy": "uniform", "k": K},
    "sortednet sandwich": {"strategy": "sandwich", "k": K},
    "sortednet uniform + distill": {"strategy": "uniform", "k": K, "distill": True},
    "sortednet sandwich + distill": {"strategy": "sandwich", "k": K, "distill": True},
    "sortednet weighted small": {"strategy": "weighted", "k": K, "weights": "small"},  # rank-weighted to small
    "sortednet sandwich small": {"strategy": "sandwich", "k": K, "weights": "small"},  # middle draws lean small
    "full only, then slice": {"strategy": "weighted", "k": 1, "weights": "full"},
    "one random sub-model per step": {"strategy": "uniform", "k": 1},
    "independent (reference)": None,
}
N_TWINS = 12


def twins(subs: tuple[sn.SubModel, ...]) -> list[sn.SubModel]:
    """A spread of sub-models (evenly spaced in the cost-sorted list, both ends included)."""
    n = len(subs)
    return [subs[round(i * (n - 1) / (N_TWINS - 1))] for i in range(N_TWINS)]


def flops(nest: sn.Nest, x: torch.Tensor) -> dict[str, float]:
    """Forward FLOPs of every sub-model on one batch (training ~ 3x forward, a common factor)."""
    out = {}
    with torch.no_grad():
        for s in nest.submodels:
            with nest.use(s), FlopCounterMode(display=False) as fc:
                nest.model(x)
            out[str(s)] = float(fc.get_total_flops())
    return out


def batches(data, seed: int):
    loader = demo.Batches(data[0], data[1], 64, seed=seed)
    while True:
        yield from loader


def calib_batches(data, seed: int) -> demo.Batches:
    """One pass over the training set: the batches that set BatchNorm statistics after training."""
    return demo.Batches(data[0], data[1], 64, seed=seed)


def has_bn(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def recalibrate_plain(model: nn.Module, data, seed: int) -> int:
    """What ``nest.calibrate`` does, for a standalone model: exact BatchNorm statistics
    (cumulative average from zero mean / unit variance) over one pass of the
    training set; returns the number of batches (0 without BatchNorm)."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns:
        return 0
    loader = calib_batches(data, seed)
    model.eval()
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
        m.train()
    with torch.no_grad():
        for x, _ in loader:
            model(x)
    model.eval()
    return len(loader)


def train_method(arch: Arch, cfg: dict, data, seed: int, steps: int, fl: dict[str, float]) -> dict:
    torch.manual_seed(seed)
    nest = arch.build()
    cfg = dict(cfg)
    distill = sn.Distill() if cfg.pop("distill", False) else None
    if cfg.get("weights") == "full":
        cfg["weights"] = [0.0] * (len(nest.submodels) - 1) + [1.0]
    sampler = sn.Sampler(nest.submodels, seed=seed, **cfg)
    opt = torch.optim.Adam(nest.trainable_parameters(), lr=3e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    it, passes, cost = batches(data, seed), 0, 0.0
    for step in range(steps):
        x, y = next(it)
        subs = sampler.draw(step)
        passes += len(subs)
        cost += sum(fl[str(s)] for s in subs)
        sn.accumulate(nest, subs, lambda: (F.cross_entropy(out := nest.model(x), y), out), distill=distill)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step()
    if has_bn(nest.model):  # per-sub-model BatchNorm statistics; forward only, ~1/3 of a training pass
        loader = calib_batches(data, seed)
        nest.calibrate(loader, batches=len(loader))
        cost += len(loader) * sum(fl.values()) / 3
    scores = evaluate(nest, (data[2], data[3]))
    return {"acc": {str(s): v for s, v in scores.items()}, "passes": passes, "flops": cost}


def train_twins(arch: Arch, subs: list[sn.SubModel], data, seed: int, steps: int, fl: dict[str, float]) -> dict:
    acc, passes, cost = {}, 0, 0.0
    for s in subs:
        torch.manual_seed(seed)
        model = arch.plain(s)
        opt = torch.optim.Adam(model.parameters(), lr=3e-3)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
        it = batches(data, seed)
        for _ in range(steps):
            x, y = next(it)
            F.cross_entropy(model(x), y).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            sched.step()
        cost += recalibrate_plain(model, data, seed) * fl[str(s)] / 3  # same recalibration as the nests
        model.eval()
        with torch.no_grad():
            acc[str(s)] = float((model(data[2]).argmax(1) == data[3]).float().mean())
        passes += steps
        cost += steps * fl[str(s)]
    return {"acc": acc, "passes": passes, "flops": cost}


def _task(key: str, method: str, seed: int, steps: int, fl: dict[str, float]) -> dict:
    """One (architecture, method, seed) training run, in this process or a worker."""
    torch.set_num_threads(1)
    arch, cfg, data = ARCHS[key], METHODS[method], demo.load_data()
    t0 = time.perf_counter()
    if cfg is None:
        r = train_twins(arch, twins(arch.build().submodels), data, seed, steps, fl)
    else:
        r = train_method(arch, cfg, data, seed, steps, fl)
    r["seconds"] = time.perf_counter() - t0
    print(f"  done [{key}] {method} seed {seed}: {r['seconds']:.0f} s", flush=True)
    return r


def run(seeds: list[int], steps_scale: float, archs: list[str], methods: list[str], jobs: int = 1,
        log=print) -> dict:
    data = demo.load_data()
    results: dict = {"seeds": seeds, "k": K, "twins": N_TWINS, "archs": {}}
    tasks = []
    for key in archs:
        arch = ARCHS[key]
        steps = max(10, int(arch.steps * steps_scale))
        nest = arch.build()
        fl = flops(nest, data[0][:64])
        params = {str(s): nest.cost(s) for s in nest.submodels}
        for s in twins(nest.submodels):  # the standalone twin really has the sub-model's size
            assert sum(p.numel() for p in arch.plain(s).parameters()) == params[str(s)], s
        results["archs"][key] = {"name": arch.name, "steps": steps, "submodels": [str(s) for s in nest.submodels],
                                 "params": params, "flops": fl, "twins": [str(s) for s in twins(nest.submodels)],
                                 "methods": {}}
        tasks += [(key, method, seed, steps, fl) for method in methods for seed in seeds]
    # independent runs (each seeds torch itself): a process pool changes no number, only the wall time;
    # the longest runs start first
    todo = sorted(tasks, key=lambda t: -t[3] * (N_TWINS if METHODS[t[1]] is None else METHODS[t[1]]["k"]))
    if jobs > 1:
        import multiprocessing as mp

        with mp.get_context("fork").Pool(jobs) as pool:
            done = dict(zip(map(id, todo), pool.starmap(_task, todo, chunksize=1)))
    else:
        done = {id(t): _task(*t) for t in todo}
    for t in tasks:
        key, method, seed, r = t[0], t[1], t[2], done[id(t)]
        results["archs"][key]["methods"].setdefault(method, []).append(r)
        accs = list(r["acc"].values())
        log(f"[{key}] {method:<32} seed {seed}: {r['seconds']:6.1f} s, acc min {min(accs):.4f} "
            f"mean {statistics.mean(accs):.4f}")
    return results


def merge(path: str, new: dict) -> dict:
    """The saved results with ``new``'s methods added or replaced (same seeds and steps required)."""
    with open(path) as f:
        old = json.load(f)
    if old["seeds"] != new["seeds"]:
        raise SystemExit(f"cannot merge: saved seeds {old['seeds']} != {new['seeds']}")
    for key, arch in new["archs"].items():
        if key not in old["archs"] or old["archs"][key]["steps"] != arch["steps"]:
            raise SystemExit(f"cannot merge {key!r}: not in {path} or run with other steps")
        runs = {**old["archs"][key]["methods"], **arch["methods"]}
        old["archs"][key]["methods"] = {m: runs[m] for m in METHODS if m in runs}
    old["wall_seconds"] = old.get("wall_seconds", 0) + new["wall_seconds"]
    return old


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--arch", nargs="+", default=list(ARCHS), choices=list(ARCHS))
    p.add_argument("--quick", action="store_true", help="1 seed, 5%% of the steps, output in a temporary folder")
    p.add_argument("--render", action="store_true", help="only re-render outputs from the saved JSON")
    p.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS),
                   help="run only these methods and merge them into the saved JSON")
    p.add_argument("--jobs", type=int, default=1, help="parallel worker processes (same numbers, less wall time)")
    p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results"))
    args = p.parse_args(argv)
    out = os.path.join(tempfile.gettempdir(), "sortednet_digits_quick") if args.quick else args.out
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, "digits.json")
    if args.render:
        with open(path) as f:
            results = json.load(f)
    else:
        torch.set_num_threads(1)
        t0 = time.perf_counter()
        results = run([0] if args.quick else list(range(args.seeds)), 0.05 if args.quick else 1.0, args.arch,
                      args.methods, jobs=args.jobs)
        results["wall_seconds"] = time.perf_counter() - t0
        results["torch"] = torch.__version__
        if set(args.methods) != set(METHODS) and os.path.exists(path):
            results = merge(path, results)
        with open(path, "w") as f:
            json.dump(results, f)
    report.write(results, out, docs=None if args.quick else os.path.join(ROOT, "docs", "training.md"))


if __name__ == "__main__":
    main()
