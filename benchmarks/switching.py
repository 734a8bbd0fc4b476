"""Switching and selection cost as the number of sub-models N grows.

One synthetic model (5 Linear layers, 4 hidden widths) is wrapped with 1 to 4
of its widths nested in 10 sizes each, giving N = 10, 100, 1,000, 10,000
sub-models over the SAME weights. For each N:

- wrap: building the nest (validation + exact parameter count of every sub-model),
  and the count alone with the grouped counter vs a walk of every parameter per sub-model;
- use: entering + leaving ``with nest.use(sub)`` for random sub-models;
- pick: ``nest.pick(params=...)`` (bisection) and ``nest.pick(params=..., flops=...)``
  (vectorised pass) for random budgets, with a profile holding scores;
- memory: weight bytes before/after wrapping and after visiting every
  sub-model (must not change), and Python bookkeeping bytes per sub-model.

A second part nests 6 widths of an 8-layer MLP in 10 sizes each:
N = 10^6 sub-models. It times wrap, the first pick (builds the selector), a
pick, a sampler draw, save and load, each with its peak of traced Python
memory (NumPy included), in a fresh process; with ``--baseline REV`` the same
script also runs against the package as of git revision REV (``git archive``,
read-only) for a before/after table.

    python benchmarks/switching.py [--quick] [--baseline REV]

(``--quick``: N up to 1,000, no 10^6 case, a few minutes; writes results/switching_quick.md.)

Writes benchmarks/results/switching.md. Targets: switching <= 50 us and flat
in N; pick <= 1 ms at N = 10,000; zero bytes of weights per extra sub-model;
at N = 10^6 every operation within ~1 s and ~100 MB.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc

import torch
from torch import nn

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from common import RESULTS, table, write  # noqa: E402

import sortednet as sn  # noqa: E402
from sortednet.cost import ParamCounter  # noqa: E402

D_IN, HID, D_OUT, SIZES = 32, 40, 8, list(range(4, 41, 4))  # 10 sizes per width


def synthetic(n_dims: int) -> sn.Nest:
    """Linear(32,40) x4 -> Linear(40,8); widths 0..n_dims-1 nested in 10 sizes, the rest fixed."""
    torch.manual_seed(0)
    layers = [nn.Linear(D_IN, HID), nn.Linear(HID, HID), nn.Linear(HID, HID), nn.Linear(HID, HID),
              nn.Linear(HID, D_OUT)]
    model = nn.Sequential(*[m for lin in layers for m in (lin, nn.ReLU())][:-1])
    dims = [sn.Width(f"w{i}", SIZES if i < n_dims else [HID], out=str(2 * i), inp=str(2 * i + 2))
            for i in range(4)]
    return sn.wrap(model, *dims)


def walk_count(nest: sn.Nest, sub: sn.SubModel) -> int:
    """The per-sub-model walk the grouped counter replaces (reference for timing)."""
    with nest.use(sub):
        total = 0
        for p in nest.model.parameters():
            owner = nest._tensor_owner.get(id(p))
            total += owner[0][0]._sn.slicer.numel(*owner[0]) if owner else p.numel()
    return total


def weight_bytes(model: nn.Module) -> int:
    """Bytes of distinct storages behind parameters and buffers."""
    seen = {}
    for t in [*model.parameters(), *model.buffers()]:
        st = t.untyped_storage()
        seen[st.data_ptr()] = st.nbytes()
    return sum(seen.values())


def per_call_us(fn, calls: list, rounds: int) -> float:
    """Median over ``rounds`` of the mean microseconds per call over ``calls``."""
    for c in calls[:50]:
        fn(c)
    out = []
    for _ in range(rounds):
        t = time.thread_time()
        for c in calls:
            fn(c)
        out.append((time.thread_time() - t) / len(calls) * 1e6)
    return statistics.median(out)


def measure(n_dims: int, quick: bool) -> dict:
    rng = random.Random(n_dims)
    plain_bytes = weight_bytes(synthetic(0).model)
    tracemalloc.start()
    kept = synthetic(n_dims)
    book = tracemalloc.get_traced_memory()[0]   # everything the nest (and its model) retains
    tracemalloc.stop()
    del kept
    t0 = time.thread_time()
    nest = synthetic(n_dims)
    wrap_s = time.thread_time() - t0
    n = len(nest.submodels)
    book_per_sub = book / n

    subs = list(nest.submodels)
    t0 = time.thread_time()
    fast = ParamCounter(nest)
    counts = [fast(s) for s in subs]
    fast_s = time.thread_time() - t0
    sample = subs if not quick else rng.sample(subs, min(n, 500))
    t0 = time.thread_time()
    walked = [walk_count(nest, s) for s in sample]
    walk_s = (time.thread_time() - t0) * n / len(sample)
    assert walked == [counts[subs.index(s)] for s in sample] if len(sample) <= 1000 else True

    def enter_leave(sub):
        with nest.use(sub):
            pass

    calls = [rng.choice(subs) for _ in range(2000)]
    use_us = per_call_us(enter_leave, calls, 7)
    strs = [str(s) for s in calls[:500]]
    use_str_us = per_call_us(enter_leave, strs, 5)

    x = torch.randn(1, D_IN)
    t0 = time.thread_time()
    prof = nest.profile(x, metrics=("flops",), score=lambda s: rng.random(), progress=False)
    profile_s = time.thread_time() - t0
    lo, hi = min(counts), max(counts)
    budgets = [rng.uniform(lo, hi) for _ in range(2000)]
    fl = prof.costs["flops"]
    fbudgets = [(b, rng.uniform(min(fl), max(fl))) for b in budgets]
    t0 = time.thread_time()
    nest.pick(params=hi)   # builds the selector once (ranking, precomputed tables)
    build_ms = (time.thread_time() - t0) * 1e3

    def pick2(b):
        try:
            nest.pick(params=b[0], flops=b[1])
        except sn.SortedNetError:
            pass

    pick_us = per_call_us(lambda b: nest.pick(params=b), budgets, 7)
    pick2_us = per_call_us(pick2, fbudgets, 7)

    with torch.no_grad():
        for s in subs[:: max(1, n // 200)]:
            with nest.use(s):
                nest.model(x)
    after_bytes = weight_bytes(nest.model)
    return {"N": n, "wrap_s": wrap_s, "count_fast_s": fast_s, "count_walk_s": walk_s, "use_us": use_us,
            "use_str_us": use_str_us, "profile_s": profile_s, "pick_us": pick_us, "pick2_us": pick2_us,
            "build_ms": build_ms,
            "weights_plain": plain_bytes, "weights_after": after_bytes, "book_per_sub": book_per_sub,
            "walk_sampled": len(sample) < n}


def million() -> dict:
    """The N = 10^6 case (run in a fresh process: see ``--million-json``).

    Each operation runs twice: once timed, once under tracemalloc for its memory
    peak (tracing slows Python code down, so it is kept out of the timing)."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    layers = [nn.Linear(D_IN, HID)] + [nn.Linear(HID, HID) for _ in range(6)] + [nn.Linear(HID, D_OUT)]
    base = nn.Sequential(*[m for lin in layers for m in (lin, nn.ReLU())][:-1])

    def wrap():
        return sn.wrap(copy.deepcopy(base), *[sn.Width(f"w{i}", SIZES, out=str(2 * i), inp=str(2 * i + 2))
                                              for i in range(6)])

    out: dict = {}

    clock = time.thread_time  # CPU seconds of this (only) thread: preemption on a shared machine is left out

    def step(name, fn):
        t0 = clock()
        value = fn()
        seconds = clock() - t0
        tracemalloc.start()
        fn()
        out[name] = (seconds, tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()
        return value

    nest = step("wrap", wrap)
    out["N"] = len(nest.submodels)
    hi = nest.cost(nest.largest)

    def first_pick():
        nest._selector = None
        return nest.pick(params=hi / 2)

    step("first pick (builds the selector)", first_pick)
    rng = random.Random(0)
    budgets = [rng.uniform(hi / 4, hi) for _ in range(1000)]
    t0 = clock()
    for b in budgets:
        nest.pick(params=b)
    out["pick (each, mean of 1000)"] = ((clock() - t0) / len(budgets), 0)
    sampler = step("Sampler(nest.submodels, k=4, 'sandwich')",
                   lambda: sn.Sampler(nest.submodels, k=4, strategy="sandwich", seed=0))
    sampler.draw(0)
    t0 = clock()
    for i in range(100):
        sampler.draw(i)
    out["sampler.draw (each, mean of 100)"] = ((clock() - t0) / 100, 0)
    path = os.path.join(tempfile.mkdtemp(), "million.safetensors")
    step("sn.save", lambda: sn.save(nest, path))
    with open(path, "rb") as f:
        out["header bytes"] = int.from_bytes(f.read(8), "little")
    out["file bytes"] = os.path.getsize(path)
    loaded = step("sn.load (fresh model)", lambda: sn.load(copy.deepcopy(base), path))
    assert len(loaded.submodels) == out["N"]
    out["max RSS (MB)"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return out


def run_million(src: str) -> dict:
    """``million()`` in a new process importing sortednet from ``src``."""
    env = {**os.environ, "PYTHONPATH": src}
    res = subprocess.run([sys.executable, __file__, "--million-json"], env=env, capture_output=True, text=True,
                         check=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


def baseline_src(rev: str) -> str:
    """A temporary copy of ``src/`` as of git revision ``rev`` (read-only ``git archive``)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    dest = tempfile.mkdtemp(prefix="sortednet-baseline-")
    archive = subprocess.run(["git", "-C", root, "archive", rev, "src"], capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", dest], input=archive, check=True)
    return os.path.join(dest, "src")


def million_table(now: dict, before: dict | None) -> str:
    ops = [k for k, v in now.items() if isinstance(v, list)]
    heads = ["operation (N = 10^6)", "CPU time (s)", "peak traced memory (MB)"]
    if before is not None:
        heads += ["before: CPU time (s)", "before: memory (MB)"]

    def cells(v: list | None) -> list[str]:
        return ["-", "-"] if v is None else [f"{v[0]:.3g}", f"{v[1] / 1e6:.3g}" if v[1] else "-"]

    rows = [[k, *cells(now[k]), *(cells(before.get(k)) if before is not None else [])] for k in ops]
    for k in ("header bytes", "file bytes", "max RSS (MB)"):
        rows.append([k, f"{now[k]:,.0f}", ""] + ([f"{before[k]:,.0f}", ""] if before is not None else []))
    return table(heads, rows)


def million_section(now: dict, before: dict | None, rev: str | None) -> str:
    return ("## 10^6 sub-models\n\nAn 8-layer MLP (32 -> 40 x7 -> 8) with 6 widths nested in 10 sizes each, "
            "one fresh process per column" + (f"; 'before' is git revision `{rev}`" if rev else "")
            + ". CPU time is the thread's own (`time.thread_time`, torch on 1 thread), so waiting for a shared CPU "
            "is not counted; each operation then runs again under tracemalloc for its peak of traced memory "
            "(Python objects and NumPy arrays; tracing itself inflates the max RSS of the 'before' run).\n\n"
            + million_table(now, before) + "\n" + million_verdict(now))


def million_verdict(now: dict) -> str:
    """The 10^6 target (every operation within ~1 s and ~100 MB), met or not, from the table's own numbers."""
    ops = {k: v for k, v in now.items() if isinstance(v, list)}
    slow = max(ops, key=lambda k: ops[k][0])
    big = max(ops, key=lambda k: ops[k][1])
    met = ops[slow][0] <= 1.0 and ops[big][1] <= 100e6
    verdict = "met" if met else "not met"
    return (f"\nTarget: every operation within ~1 s of CPU time and ~100 MB of traced memory: **{verdict}** "
            f"(slowest: {slow}, {ops[slow][0]:.3g} s; largest: {big}, {ops[big][1] / 1e6:.3g} MB). The max RSS is "
            "the whole process, torch's own libraries and the model included, not what the sub-models add.\n")


def million_runs(rev: str | None) -> tuple[dict, dict | None]:
    """The 10^6 case now and (cached in results/, as measured) at revision ``rev``."""
    src = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src")
    now = run_million(src)
    print(now, flush=True)
    write("switching_million.json", json.dumps(now))
    before = None
    if rev:
        cache = os.path.join(RESULTS, f"switching_million_{rev}.json")
        if os.path.exists(cache):
            with open(cache) as f:
                before = json.load(f)
        else:
            before = run_million(baseline_src(rev))
            write(f"switching_million_{rev}.json", json.dumps(before))
        print(before, flush=True)
    return now, before


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    ap.add_argument("--quick", action="store_true", help="sample the per-sub-model walk instead of timing it all")
    ap.add_argument("--baseline", metavar="REV", help="also run the 10^6 case against git revision REV")
    ap.add_argument("--million-only", action="store_true",
                    help="run only the 10^6 case and replace its section of results/switching.md")
    ap.add_argument("--million-json", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.million_json:
        print(json.dumps(million()))
        return
    # --quick: N up to 1,000, no 10^6 case, written to results/switching_quick.md (the committed results stay)
    big_now, big_before = (None, None) if args.quick and not args.million_only else million_runs(args.baseline)
    if args.million_only:
        with open(os.path.join(RESULTS, "switching.md")) as f:
            head = f.read().split("## 10^6 sub-models")[0]
        print("wrote", write("switching.md", head + million_section(big_now, big_before, args.baseline)))
        return
    torch.set_num_threads(1)
    measure(1, quick=True)   # warm-up: first FlopCounterMode / dispatch use is slow
    rows = []
    for k in ((1, 2, 3) if args.quick else (1, 2, 3, 4)):
        r = measure(k, args.quick)
        print(r, flush=True)
        rows.append(r)
    big = rows[-1]
    use_flat = max(r["use_us"] for r in rows) / min(r["use_us"] for r in rows)
    extra_weights = max(r["weights_after"] - r["weights_plain"] for r in rows)
    summary = table(["measure", "value", "target", "met"], [
        ["use() enter+leave, worst over N (us)", round(max(r["use_us"] for r in rows), 1), "<= 50",
         max(r["use_us"] for r in rows) <= 50],
        [f"use() max/min over N = 10..{big['N']:,}", round(use_flat, 2), "flat: <= 1.5", use_flat <= 1.5],
        [f"pick(params) at N = {big['N']:,} (us)", round(big["pick_us"], 1), "<= 1000", big["pick_us"] <= 1000],
        [f"pick(params, flops) at N = {big['N']:,} (us)", round(big["pick2_us"], 1), "<= 1000",
         big["pick2_us"] <= 1000],
        ["weight bytes per extra sub-model", extra_weights, "0", extra_weights == 0],
    ])
    per_n = table(["N", "wrap (s)", "param count: grouped (s)", "param count: walk per sub-model (s)",
                   "use() enter+leave (us)", "use('w0=..') from a string (us)", "first pick: build (ms)",
                   "pick(params) (us)",
                   "pick(params, flops) (us)", "profile flops+score (s)", "weight bytes", "bookkeeping B/sub-model"],
                  [[r["N"], round(r["wrap_s"], 3), round(r["count_fast_s"], 3),
                    f"{r['count_walk_s']:.3f}" + (" (extrapolated from 500)" if r["walk_sampled"] else ""),
                    round(r["use_us"], 1), round(r["use_str_us"], 1), round(r["build_ms"], 1), round(r["pick_us"], 1),
                    round(r["pick2_us"], 1), round(r["profile_s"], 2), r["weights_after"],
                    round(r["book_per_sub"])] for r in rows])
    text = (f"# Switching and selection vs number of sub-models\n\nCommand: `python benchmarks/switching.py"
            f"{' --quick' if args.quick else ''}`; torch {torch.__version__}, {platform.machine()}, 1 thread, "
            "CPU; times are the thread's own CPU time (`time.thread_time`: waiting for a shared CPU is not "
            "counted). Model: 5 Linear layers (32 -> 40 x4 -> 8), widths nested in 10 sizes each; N = 10^k "
            "sub-models share one copy of the weights.\n\n## Summary\n\n" + summary +
            "\n\n## Per N\n\n" + per_n +
            "\n\n`use()` times are medians of 7 rounds of 2,000 random sub-models (given as `SubModel`; "
            "the string column parses and validates each call). `pick` times are medians of 7 rounds of "
            "2,000 random budgets after the selector was built once (timed apart: the first pick after a profile). "
            "'weight bytes' is measured after running 200 sub-models: equal to the plain model's "
            f"({rows[0]['weights_plain']} bytes), so extra sub-models cost no weight memory; "
            "'bookkeeping' is Python memory traced while wrapping (sub-model objects, parameter-count "
            "cache), divided by N.\n\n"
            + ("" if big_now is None else million_section(big_now, big_before, args.baseline)))
    print(text)
    print("wrote", write("switching_quick.md" if args.quick else "switching.md", text))


if __name__ == "__main__":
    main()
