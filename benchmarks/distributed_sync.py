"""Gradient synchronisation of a nest on 2 CPU ranks (gloo): correctness and cost of each way.

    PYTHONPATH=src python benchmarks/distributed_sync.py        # ~1-2 minutes on 2 cores

A residual MLP stack (Width "ffn" x Depth "depth") trains uniformly drawn
sub-models, k=3 per step. For each way of synchronising, the table gives the
largest difference between the averaged gradients and one process's
gradients on the whole global batch (steps 0-3), and the median time of
a training step's forwards, backwards and synchronisation (ways timed
round-robin). Writes benchmarks/results/distributed_sync.{md,json}.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import socket
import statistics
import time
from contextlib import nullcontext

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

import sortednet as sn
import sortednet.distributed as snd

WORLD = 2
WAYS = {
    "sn.distributed.accumulate + DDP (default)": dict(inplace=True, ddp="plain", how="sortednet"),
    "sn.distributed.accumulate + FSDP2 (per-block fully_shard)": dict(inplace=True, ddp="fsdp2", how="sortednet"),
    "inplace_grad=False + DDP(find_unused_parameters=True), no_sync but last": dict(
        inplace=False, ddp="unused", how="reducer_last"),
    "inplace_grad=False + DDP(find_unused_parameters=True), sync every backward": dict(
        inplace=False, ddp="unused", how="reducer_each"),
    "plain loop, inplace_grad=True + DDP(find_unused_parameters=True), no_sync but last": dict(
        inplace=True, ddp="unused", how="reducer_last"),
    "plain loop, inplace_grad=True + DDP(find_unused_parameters=False), no_sync but last": dict(
        inplace=True, ddp="plain", how="reducer_last"),
}


class Stack(nn.Module):
    def __init__(self, d: int, layers: int) -> None:
        super().__init__()
        self.inp = nn.Linear(d, d)
        self.blocks = nn.ModuleList(nn.Sequential(nn.LayerNorm(d), nn.Linear(d, 4 * d), nn.GELU(),
                                                  nn.Linear(4 * d, d)) for _ in range(layers))
        self.head = nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.inp(x)
        for b in self.blocks:
            x = x + b(x)
        return self.head(x)


def build(d: int, layers: int, inplace: bool) -> tuple[nn.Module, sn.Nest]:
    torch.manual_seed(0)
    model = Stack(d, layers)
    nest = sn.wrap(model, sn.Width("ffn", [d // 2, d, 2 * d, 4 * d], out="blocks.*.1", inp="blocks.*.3"),
                   sn.Depth("depth", list(range(1, layers + 1)), layers="blocks"), inplace_grad=inplace)
    return model, nest


def batch(step: int, n: int, d: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(step)
    return torch.randn(n, d, generator=g), torch.randn(n, d, generator=g)


class Way:
    """One way of synchronising: its own model copy, wrapper and sampler (the same draws for every way)."""

    def __init__(self, rank: int, cfg: dict, a: argparse.Namespace) -> None:
        self.rank, self.cfg, self.a = rank, cfg, a
        self.model, self.nest = build(a.d, a.layers, cfg["inplace"])
        if cfg["ddp"] == "fsdp2":
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.fsdp import fully_shard

            mesh = init_device_mesh("cpu", (WORLD,))
            for b in self.model.blocks:
                fully_shard(b, mesh=mesh)
            self.module = fully_shard(self.model, mesh=mesh)
        else:
            self.module = DDP(self.model, find_unused_parameters=cfg["ddp"] == "unused")
        self.sampler = sn.Sampler(self.nest.submodels, k=3, strategy="uniform", seed=0)

    def step(self, step: int) -> float:
        """One training step's forward/backward/sync (no optimizer: weights stay put); returns seconds."""
        per, a, module = self.a.batch // WORLD, self.a, self.module
        x, y = batch(step, a.batch, a.d)
        x, y = x[self.rank * per:(self.rank + 1) * per], y[self.rank * per:(self.rank + 1) * per]
        subs = self.sampler.draw(step)
        closure = lambda: (module(x) - y).square().mean()  # noqa: E731
        for p in self.model.parameters():
            p.grad = None
        t0 = time.perf_counter()
        if self.cfg["how"] == "sortednet":
            snd.accumulate(self.nest, subs, closure, module=module)
        else:
            for i, s in enumerate(subs):
                last = i == len(subs) - 1
                with (nullcontext() if last or self.cfg["how"] == "reducer_each" else module.no_sync()), \
                        self.nest.use(s):
                    (closure() / len(subs)).backward()
        return time.perf_counter() - t0


def grad_error(model: nn.Module, nest: sn.Nest, sampler: sn.Sampler, step: int, a: argparse.Namespace) -> float:
    ref, rnest = build(a.d, a.layers, True)
    ref.load_state_dict({k: v.full_tensor() if hasattr(v, "full_tensor") else v for k, v in model.state_dict().items()})
    x, y = batch(step, a.batch, a.d)
    sn.accumulate(rnest, sampler.draw(step), lambda: (ref(x) - y).square().mean())
    worst = 0.0
    for p, q in zip(model.parameters(), ref.parameters()):
        g = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
        if (g is None) != (q.grad is None):
            return float("inf")
        if g is not None:
            worst = max(worst, (g - q.grad).abs().max().item())
    return worst


def worker(rank: int, port: int, a: argparse.Namespace, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=datetime.timedelta(seconds=30))
    ways, rows = {}, {}
    for name, cfg in WAYS.items():           # correctness: steps 0-3 against one process
        way = Way(rank, cfg, a)
        try:
            err = 0.0
            for step in range(4):
                way.step(step)
                err = max(err, grad_error(way.model, way.nest, way.sampler, step, a))
            ways[name], rows[name] = way, {"max_grad_error": err, "times": []}
        except Exception as e:  # the misuse rows: DDP refuses
            rows[name] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:110]}"}
        dist.barrier()
    for r in range(a.steps):                 # timing: round-robin, so machine load hits every way alike
        for name, way in ways.items():
            rows[name]["times"].append(way.step(4 + r))
    for name in ways:
        rows[name]["ms_per_step"] = 1000 * statistics.median(rows[name].pop("times"))
    if rank == 0:
        with open(out, "w") as f:
            json.dump(rows, f)
    dist.destroy_process_group()


def main() -> None:
    p = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    p.add_argument("--d", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--batch", type=int, default=64, help="global batch")
    p.add_argument("--steps", type=int, default=15, help="timed steps per way")
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "distributed_sync"))
    a = p.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    raw = a.out + ".json"
    mp.spawn(worker, args=(port, a, raw), nprocs=WORLD)
    with open(raw) as f:
        rows = json.load(f)
    _, nest = build(a.d, a.layers, True)
    lines = [f"Gradient sync on {WORLD} CPU ranks (gloo), {torch.__version__}; model: residual MLP stack d={a.d}, "
             f"{a.layers} blocks, {nest.cost(nest.largest):,} params, {len(nest.submodels)} sub-models (ffn x depth); "
             f"uniform k=3; global batch {a.batch}; median of {a.steps} timed steps per way, taken round-robin.",
             "", "| way | max grad error vs 1 process | ms / step | outcome |", "| --- | ---: | ---: | --- |"]
    for name, r in rows.items():
        if "error" in r:
            lines.append(f"| {name} | - | - | raises {r['error']} |")
        else:
            ok = "correct" if r["max_grad_error"] < 1e-4 else "WRONG gradients, no error"
            lines.append(f"| {name} | {r['max_grad_error']:.2e} | {r['ms_per_step']:.1f} | {ok} |")
    lines += ["", "`plain loop`: `with ddp.no_sync()` (all but the last sub-model) and `nest.use(sub)` around each "
              "backward, DDP's own reducer averaging. Depth makes skipped blocks unused: without "
              "`find_unused_parameters=True` DDP raises at the next step. With it, the in-place gradient path "
              "(`inplace_grad=True`) still reaches DDP: the parameter's gradient node runs with no gradient of its own "
              "and DDP's hook there averages `.grad` as the slice left it. `snd.accumulate` needs neither flag and "
              "pays for its per-step rank agreement (a few small all_reduces) in the ms column."]
    text = "\n".join(lines) + "\n"
    with open(a.out + ".md", "w") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    main()
