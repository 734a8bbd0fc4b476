"""Overhead of running a sub-model inside the wrapped model vs a standalone model
of the same size, eager and compiled.

Every ratio is measured side by side in one run (round-robin timing, medians, one
intra-op thread). Models: the MLP and transformer stacks, a ResNet-18-style CNN with
BatchNorm, a ViT-tiny-sized encoder and a ~56M-parameter Llama decoder built from its
config with ``sn.from_transformers`` (training, inference and one-token decoding with a
KV cache). The standalone model of a sub-model is built independently at its size where
the model class allows it, else it is ``nest.export(sub)``. Compiled rows compare
``torch.compile`` (inductor) of the live model under ``use(sub)`` with the compiled
standalone model; they need a C++ compiler and are skipped, with a note, without one.

    python benchmarks/overhead.py [--quick] [--compile-all] [--no-compile] [--repeat N] [--device cuda]

Writes benchmarks/results/overhead.md (``--quick``: overhead_quick.md; ``--device cuda``: overhead_cuda.md,
overhead_quick_cuda.md). On a GPU every model, input and compiled graph lives there, and a time is the
wall-clock time of a call up to ``torch.cuda.synchronize()``.
"""

from __future__ import annotations

import argparse
import inspect
import platform
import shlex
import shutil
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch._dynamo
from torch import nn
from torch._dynamo.testing import CompileCounterWithBackend
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from bench_models import BlockStack, FFNStack, ResNet18, ViT, llama_config  # noqa: E402
from common import interleaved, table, write  # noqa: E402

import sortednet as sn  # noqa: E402

#: the calling thread's CPU time: with one intra-op thread it holds all of torch's CPU work, and
#: time spent preempted by other processes on a shared machine does not count
CLOCK = time.thread_time


def _cuda_clock() -> float:
    """Wall-clock seconds once the GPU has finished everything queued so far (a GPU's work is asynchronous:
    the CPU time of the launching thread says nothing of it)."""
    torch.cuda.synchronize()
    return time.perf_counter()


@dataclass
class Setup:
    name: str
    model: nn.Module
    nest: Any
    subs: list
    alone: dict                      # str(sub) -> standalone module
    independent: bool                # standalone built at its size (else: the exported copy)
    train: Callable[[nn.Module], None]
    infer: Callable[[nn.Module], None]
    decode: Callable[[nn.Module, Any], Callable[[], None]] | None = None
    compile: tuple[str, ...] = ()
    sorted_step: bool = False
    opt_model: Callable[[], nn.Module] | None = None
    rows: dict = field(default_factory=dict)


def _loss(out: Any) -> torch.Tensor:
    return out.float().square().mean()


def _stack_setups(quick: bool):
    torch.manual_seed(0)
    x = torch.randn(256, 256)
    ffn = [128, 256, 512, 1024]
    m = FFNStack()
    nest = sn.wrap(m, sn.Width("ffn", ffn, out="blocks.*.0", inp="blocks.*.2"))
    subs = [nest.resolve({"ffn": s}) for s in ([128, 1024] if quick else ffn)]
    yield Setup("mlp_stack", m, nest, subs, {str(s): FFNStack(ffn=s["ffn"]) for s in subs}, True,
                lambda mod: _loss(mod(x)).backward(), lambda mod: mod(x), compile=("infer", "train"),
                sorted_step=True, opt_model=FFNStack)
    x2 = torch.randn(8, 64, 256)
    m = BlockStack()
    nest = sn.wrap(m, sn.Heads("heads", [2, 4, 8], attn="blocks.*.attn"),
                   sn.Width("ffn", [256, 512, 1024], out="blocks.*.fc1", inp="blocks.*.fc2"))
    subs = [nest.resolve(s) for s in [{"heads": 2, "ffn": 256}, {"heads": 4, "ffn": 512}, {"heads": 8, "ffn": 1024}]]
    subs = subs[::2] if quick else subs
    yield Setup("transformer_stack", m, nest, subs,
                {str(s): BlockStack(heads=s["heads"], ffn=s["ffn"]) for s in subs}, True,
                lambda mod: _loss(mod(x2)).backward(), lambda mod: mod(x2),
                compile=() if quick else ("infer", "train"), sorted_step=True, opt_model=BlockStack)


def _cnn_vit_setups(quick: bool):
    torch.manual_seed(0)
    mids = (64, 128, 256, 512)
    m = ResNet18()
    dims = [sn.Width(f"s{i}", [c // 4, c // 2, c], out=f"stages.{i}.*.conv1", norm=f"stages.{i}.*.bn1",
                     inp=f"stages.{i}.*.conv2") for i, c in enumerate(mids)]
    diag = [{f"s{i}": c // f for i, c in enumerate(mids)} for f in (4, 2, 1)]
    nest = sn.wrap(m, *dims, submodels=diag)
    subs = [nest.resolve(s) for s in (diag[::2] if quick else diag)]
    x = torch.randn(8, 3, 64, 64)
    yield Setup("resnet18_bn", m, nest, subs, {str(s): ResNet18(tuple(s.values())) for s in subs}, True,
                lambda mod: _loss(mod(x)).backward(), lambda mod: mod(x))
    m = ViT()
    cfgs = [{"heads": 1, "mlp": 192}, {"heads": 2, "mlp": 384}, {"heads": 3, "mlp": 768}]
    nest = sn.wrap(m, sn.Heads("heads", [1, 2, 3], attn="blocks.*.attn"),
                   sn.Width("mlp", [192, 384, 768], out="blocks.*.fc1", inp="blocks.*.fc2"), submodels=cfgs)
    subs = [nest.resolve(s) for s in (cfgs[::2] if quick else cfgs)]
    xv = torch.randn(2, 3, 224, 224)
    yield Setup("vit_tiny", m, nest, subs, {str(s): ViT(heads=s["heads"], ffn=s["mlp"]) for s in subs}, True,
                lambda mod: _loss(mod(xv)).backward(), lambda mod: mod(xv))


def _llama_setup(quick: bool):
    try:
        from transformers import DynamicCache, LlamaForCausalLM
    except ImportError:
        return
    torch.manual_seed(0)
    m = LlamaForCausalLM(llama_config())
    nest = sn.from_transformers(m, ffn=[352, 704], heads=[2, 4], depth=[4, 6])
    picks = [nest.smallest, nest.resolve({"ffn": 704, "heads": 4, "depth": 6}), nest.largest]
    subs = picks[::2] if quick else picks
    ids = torch.randint(0, 32000, (2, 32))
    cache_kw = "cache" if "cache" in inspect.signature(m.forward).parameters else "past_key_values"

    def decode(mod: nn.Module, sub: Any) -> Callable[[], None]:
        cache = DynamicCache()
        with torch.no_grad(), (nest.use(sub) if mod is m else _null()):
            nxt = mod(input_ids=ids, use_cache=True, **{cache_kw: cache}).logits[:, -1:].argmax(-1)

        def step() -> None:
            mod(input_ids=nxt, use_cache=True, **{cache_kw: cache})
            cache.crop(-1)
        return step

    yield Setup("llama_56M", m, nest, subs, {str(s): nest.export(s) for s in subs}, False,
                lambda mod: mod(input_ids=ids, labels=ids).loss.backward(),
                lambda mod: mod(input_ids=ids, use_cache=False), decode=decode)


class _null:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def compiler() -> str | None:
    """The C++ compiler inductor would use on CPU, or None."""
    for cxx in ("g++", "c++", "clang++"):
        if shutil.which(cxx):
            return shutil.which(cxx)
    return None


def measure(st: Setup, repeat: int, compiled: bool, compile_all: bool) -> None:
    model, nest = st.model, st.nest
    modes = st.compile if not compile_all else ("infer", "train")
    modes = modes if compiled else ()
    counters = {m: CompileCounterWithBackend("inductor") for m in modes}
    c_live = {mode: torch.compile(model, backend=counters[mode]) for mode in modes}
    if "train" in modes:  # training: nest.compile() (sliced weights as graph inputs, in-place slice gradients)
        c_live["train"] = nest.compile(backend=counters["train"])
        c_plain = torch.compile(model)
    c_alone = {mode: {k: torch.compile(a) for k, a in st.alone.items()} for mode in modes}

    def under(sub, fn, mod):
        def f():
            with nest.use(sub):
                fn(mod)
        return f

    train, infer, dec, exports = {}, {}, {}, []
    for s in st.subs:
        k = str(s)
        train[f"live|{k}"], train[f"alone|{k}"] = under(s, st.train, model), (lambda a=st.alone[k]: st.train(a))
        infer[f"live|{k}"], infer[f"alone|{k}"] = under(s, st.infer, model), (lambda a=st.alone[k]: st.infer(a))
        if "train" in modes:
            train[f"clive|{k}"] = under(s, st.train, c_live["train"])
            train[f"cplain|{k}"] = under(s, st.train, c_plain)
            train[f"calone|{k}"] = lambda a=c_alone["train"][k]: st.train(a)
        if "infer" in modes:
            infer[f"clive|{k}"] = under(s, st.infer, c_live["infer"])
            infer[f"calone|{k}"] = lambda a=c_alone["infer"][k]: st.infer(a)
        if st.independent:
            exports.append(nest.export(s))
            infer[f"export|{k}"] = lambda e=exports[-1]: st.infer(e)
    if st.sorted_step:
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        full = st.opt_model()
        full_opt = torch.optim.AdamW(full.parameters(), lr=1e-4)
        for p in full.parameters():
            p.grad = torch.zeros_like(p)

        def sorted_step():
            for s in st.subs:
                with nest.use(s):
                    st.train(model)
            opt.step()
            opt.zero_grad(set_to_none=False)  # keep .grad: see the note in the results

        def ideal_step():
            for a in st.alone.values():
                st.train(a)
            full_opt.step()
            full_opt.zero_grad(set_to_none=False)

        train["step|sorted"], train["step|ideal"] = sorted_step, ideal_step
    for mod in [model, *st.alone.values()]:
        mod.train()
    t_tr = interleaved(train, repeat=repeat, clock=CLOCK)
    for mod in [model, *st.alone.values(), *exports]:
        mod.eval()
    with torch.no_grad():
        t_in = interleaved(infer, repeat=repeat * 2, clock=CLOCK)
        if st.decode is not None:
            for s in st.subs:
                k = str(s)
                step = st.decode(model, s)
                dec[f"live|{k}"] = under(s, lambda _m, step=step: step(), model)
                dec[f"alone|{k}"] = st.decode(st.alone[k], s)
            t_dec = interleaved(dec, repeat=repeat * 2, clock=CLOCK)
    for s in st.subs:
        k = str(s)
        r = {"train": t_tr[f"live|{k}"] / t_tr[f"alone|{k}"], "infer": t_in[f"live|{k}"] / t_in[f"alone|{k}"],
             "alone_train_ms": t_tr[f"alone|{k}"] * 1e3, "alone_infer_ms": t_in[f"alone|{k}"] * 1e3}
        if dec:
            r["decode"] = t_dec[f"live|{k}"] / t_dec[f"alone|{k}"]
        if st.independent:
            r["export"] = t_in[f"export|{k}"] / t_in[f"alone|{k}"]
        if "train" in modes:
            r["ctrain"] = t_tr[f"clive|{k}"] / t_tr[f"calone|{k}"]
            r["ctrain_plain"] = t_tr[f"cplain|{k}"] / t_tr[f"calone|{k}"]
        if "infer" in modes:
            r["cinfer"] = t_in[f"clive|{k}"] / t_in[f"calone|{k}"]
        r["fns"] = {c: (fns[f"{p}live|{k}"], fns[f"{p}alone|{k}"])
                    for c, p, fns in (("train", "", train), ("infer", "", infer), ("ctrain", "c", train),
                                      ("cinfer", "c", infer)) if f"{p}live|{k}" in fns}
        st.rows[k] = r
    if st.sorted_step:
        st.rows["step"] = t_tr["step|sorted"] / t_tr["step|ideal"], t_tr["step|ideal"] * 1e3
    st.rows["compiled"] = {}
    for mode in modes:  # switch back and forth: a graph per (sub-model, mode), no recompile on switching back
        before = counters[mode].frame_count
        ctx = torch.no_grad() if mode == "infer" else _null()
        (model.eval if mode == "infer" else model.train)()
        with ctx:
            for s in [*st.subs, *st.subs[::-1], *st.subs]:
                with nest.use(s):
                    (st.infer if mode == "infer" else st.train)(c_live[mode])
        st.rows["compiled"][mode] = (before, counters[mode].frame_count - before)


class OpTimes(TorchDispatchMode):
    """Thread CPU time spent in each aten op (below autograd: forward and backward kernels)."""

    def __init__(self) -> None:
        super().__init__()
        self.times: dict[str, float] = {}
        self.calls: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        t = CLOCK()
        out = func(*args, **(kwargs or {}))
        name = func._schema.name
        self.times[name] = self.times.get(name, 0.0) + CLOCK() - t
        self.calls[name] = self.calls.get(name, 0) + 1
        return out

    @staticmethod
    def per_call_overhead() -> float:
        """Seconds the timing adds to each op (median over calls of a view op on a tiny tensor)."""
        x = torch.zeros(1)
        per = []
        for _ in range(5):
            with OpTimes() as o:
                for _ in range(100):
                    x.view(-1)
            per.append(o.times["aten::view"] / 100)
        return statistics.median(per)


def profile_gap(live: Callable[[], None], alone: Callable[[], None], rounds: int = 7, top: int = 12,
                torch_profiler: bool = False) -> str:
    """Per-op self time (ms per call) of the live and standalone runs, largest differences first,
    medians over ``rounds`` alternating single calls. By default each aten op's thread CPU time
    (:class:`OpTimes`); ``torch_profiler=True`` reads ``torch.profiler``'s self CPU times instead,
    which are wall-clock: on a loaded shared machine they mostly measure preemption."""
    from torch.profiler import ProfilerActivity, profile

    samples: dict[str, list[dict[str, float]]] = {"live": [], "standalone": []}
    for f in (live, alone):
        f()
    over = 0.0 if torch_profiler else OpTimes.per_call_overhead()
    for _ in range(rounds):
        for name, f in (("live", live), ("standalone", alone)):
            t = CLOCK()
            f()
            total = (CLOCK() - t) * 1e3
            if torch_profiler:
                with profile(activities=[ProfilerActivity.CPU]) as p:
                    f()
                ops = {e.key: e.self_cpu_time_total / 1e3 for e in p.key_averages()}
            else:
                with OpTimes() as o:
                    f()
                ops = {k: max(0.0, v - over * o.calls[k]) * 1e3 for k, v in o.times.items()}
            ops["(outside ops: Python, autograd engine, dispatch)"] = total - sum(ops.values())
            ops["(total, without profiling)"] = total
            samples[name].append(ops)

    def med(name: str, key: str) -> float:
        return statistics.median(s.get(key, 0.0) for s in samples[name])

    keys = {k for s in samples["live"] + samples["standalone"] for k in s}
    rows = [[k, med("live", k), med("standalone", k), med("live", k) - med("standalone", k)] for k in keys]
    extra = sorted((r for r in rows if r[0].startswith("(")), key=lambda r: r[0], reverse=True)
    rows = sorted((r for r in rows if not r[0].startswith("(")), key=lambda r: -abs(r[3]))[:top]
    tab = table(["op (self time)", "live ms", "standalone ms", "difference ms"], rows + extra)
    if torch_profiler:
        return tab
    gap = {r[0]: r[3] for r in extra}
    base = {r[0]: r[2] for r in extra}
    total, outside = gap.get("(total, without profiling)"), gap.get("(outside ops: Python, autograd engine, dispatch)")
    alone_ms = base.get("(total, without profiling)")
    if total is None or outside is None or not alone_ms:
        return tab
    ops = [r for r in rows if r[3] > 0][:3]
    diffs = ", ".join(f"`{r[0]}` {r[3]:+.3f} ms" for r in ops)
    if total <= 0.02 * alone_ms:
        cause = (f"In this profiling pass the live call was within 2% of the standalone one ({total:+.3f} ms of "
                 f"{alone_ms:.3f} ms): at this size the timed ratio above is mostly run-to-run noise. Differences "
                 f"that remain: outside aten ops {outside:+.3f} ms; ops {diffs}.")
    else:
        cause = (f"Cause, from this table: the live call took {total:.3f} ms more ({100 * total / alone_ms:.0f}% of "
                 f"{alone_ms:.3f} ms); outside aten ops (Python attribute reads, the slicing autograd function, the "
                 f"autograd engine) {outside:+.3f} ms; the largest op differences: {diffs}.")
    return tab + "\n\n" + cause


def _fmt(v: float | None) -> str:
    return "–" if v is None else f"{v:.3f}"


def _stat(vals: list[float]) -> tuple[float, float] | None:
    return (statistics.median(vals), max(vals)) if vals else None


def _verdict(got: tuple[float, float] | None, median: float | None, worst: float) -> str:
    if got is None:
        return "not measured"
    ok = (median is None or got[0] <= median) and got[1] <= worst
    return "**met**" if ok else "**not met**"


def run(quick: bool, compile_mode: str, torch_profiler: bool = False, repeat: int = 0, device: str = "cpu") -> str:
    global CLOCK
    gpu = torch.device(device).type != "cpu"
    if gpu:  # models, inputs and caches built on the device; times up to the device's end of work
        torch.set_default_device(device)
        CLOCK, torch_profiler = _cuda_clock, True
    torch.manual_seed(0)
    torch._dynamo.config.recompile_limit = 64
    if hasattr(torch._dynamo.config, "accumulated_recompile_limit"):
        torch._dynamo.config.accumulated_recompile_limit = 1024
    cxx = compiler()
    compiled = compile_mode != "none" and (cxx is not None or gpu)
    repeat = repeat or (7 if quick else 15)
    setups = []
    t0 = time.perf_counter()
    for gen in (_stack_setups, _cnn_vit_setups, _llama_setup):
        for st in gen(quick):
            measure(st, repeat, compiled, compile_mode == "all")
            print(f"{st.name}: done at {time.perf_counter() - t0:.0f} s", flush=True)
            setups.append(st)
    rows, cols = [], ("train", "infer", "decode", "export", "ctrain", "ctrain_plain", "cinfer")
    got: dict[str, list[float]] = {c: [] for c in cols}
    worst = {"train": (0.0, None), "infer": (0.0, None), "ctrain": (0.0, None), "cinfer": (0.0, None)}
    for st in setups:
        for s in st.subs:
            r = st.rows[str(s)]
            rows.append([st.name, str(s), *(_fmt(r.get(c)) for c in cols), r["alone_train_ms"], r["alone_infer_ms"]])
            for c in cols:
                if c in r:
                    got[c].append(r[c])
            for c in worst:
                if c in r and r[c] > worst[c][0]:
                    worst[c] = (r[c], (st.name, str(s), r["fns"][c]))
    steps = [[st.name, len(st.subs), *st.rows["step"]] for st in setups if "step" in st.rows]
    step_stat = _stat([r[2] for r in steps])
    a, c, d, e = _stat(got["train"]), _stat(got["infer"]), _stat(got["decode"]), _stat(got["export"])
    ct, ci, ctp = _stat(got["ctrain"]), _stat(got["cinfer"]), _stat(got["ctrain_plain"])
    summary = [
        ["(a) train fwd+bwd live / standalone", a, "median <= 1.05, worst <= 1.15", _verdict(a, 1.05, 1.15)],
        ["(c) inference live / standalone", c, "median <= 1.05, worst <= 1.15", _verdict(c, 1.05, 1.15)],
        ["(c) decode 1 token (KV cache) live / standalone", d, "median <= 1.05, worst <= 1.15",
         _verdict(d, 1.05, 1.15)],
        ["(c) compiled inference live / compiled standalone", ci, "<= 1.03", _verdict(ci, None, 1.03)],
        ["compiled train live (`nest.compile()`) / compiled standalone", ct, "<= 1.03 (same bar as inference)",
         _verdict(ct, None, 1.03)],
        ["compiled train, plain `torch.compile(model)` / compiled standalone", ctp, "(for comparison)", ""],
        ["(b) sorted step / ideal", step_stat, "<= 1.0", _verdict(step_stat, None, 1.0)],
        ["(b) inference exported / standalone", e, "<= 1.02", _verdict(e, None, 1.02)],
    ]
    summary = [[m, *(("–", "–") if v is None else v), t, ok] for m, v, t, ok in summary]
    comp_rows = []
    for st in setups:
        for mode, (graphs, recompiles) in st.rows["compiled"].items():
            comp_rows.append([st.name, mode, len(st.subs), graphs, recompiles])
    if not compiled:
        comp_note = ("Compiled rows skipped: " + ("--no-compile was given." if compile_mode == "none" else
                     "no C++ compiler (g++, c++ or clang++) on PATH, which inductor needs on CPU."))
    else:
        comp_note = (f"Inductor ({'Triton kernels on the GPU' if gpu else cxx}). Compiled for: "
                     + ", ".join(f"{st.name} ({'/'.join(st.rows['compiled'])})" for st in setups if st.rows["compiled"])
                     + ("" if compile_mode == "all" else "; every model and mode runs compiled with "
                        "`--compile-all` (minutes of compilation per graph on a loaded CPU)") + ".")
    prof = []
    for what, label in (("train", "(a) train fwd+bwd"), ("infer", "(c) inference"),
                        ("ctrain", "compiled train"), ("cinfer", "compiled inference")):
        ratio, where = worst[what]
        if where is None:
            continue
        name, sub, (live, alone) = where
        for mod in {id(m): m for st in setups if st.name == name for m in [st.model, *st.alone.values()]}.values():
            mod.train(what.endswith("train"))
        with (torch.no_grad() if what.endswith("infer") else _null()):
            # a TorchDispatchMode makes Dynamo run compiled frames eagerly: compiled rows need torch.profiler
            tab = profile_gap(live, alone, torch_profiler=torch_profiler or what.startswith("c"))
        how = " (torch.profiler, wall-clock)" if what.startswith("c") and not torch_profiler else ""
        prof += [f"### Worst {label}: {name} {sub} (ratio {ratio:.3f}){how}", tab]
    text = "\n\n".join([
        "# Overhead of sub-models in the wrapped model vs standalone models",
        f"Command: `{shlex.join(['python', 'benchmarks/overhead.py', *sys.argv[1:]])}`; "
        f"torch {torch.__version__}, {platform.machine()}, "
        + (f"GPU {torch.cuda.get_device_name()}; times are wall-clock up to `torch.cuda.synchronize()`"
           if gpu else f"{torch.get_num_threads()} thread(s); times are the calling thread's CPU time "
           "(`time.thread_time`: preemption by other processes is left out)")
        + f"; medians of {repeat} round-robin repeats "
        f"(inference and decoding: {2 * repeat}); total {time.perf_counter() - t0:.0f} s. Standalone: an "
        "independently built model of the sub-model's size (llama: `nest.export(sub)`).",
        "## Summary (targets)",
        table(["measure", "median", "worst", "target", "verdict"], summary),
        "## Per sub-model (ratios to a standalone model of the same size)",
        "`train`: forward + backward (gradients accumulated into `.grad`); `infer`: forward under `no_grad`; "
        "`decode`: one token with a KV cache of 32; `export`: `nest.export(sub)` vs the standalone model; "
        "`c-train`: `nest.compile()` (inductor; the sliced weights enter the graph as inputs and their "
        "gradients go into the slices of `.grad`) under `use(sub)`; `c-train plain`: `torch.compile(model)`, "
        "which slices inside the graph (full-size weight gradients); `c-infer`: `torch.compile(model)` under "
        "`use(sub)` and `no_grad` (`nest.compile()` runs the same graph there); each vs the compiled "
        "standalone model.",
        table(["model", "sub-model", "train", "infer", "decode", "export", "c-train", "c-train plain", "c-infer",
               "standalone train ms", "standalone infer ms"], rows),
        "## One sorted training step (all listed sub-models accumulated + AdamW step)",
        "The ideal is the standalone models' forward+backward plus one AdamW step of the full model; "
        "`zero_grad(set_to_none=False)` in both.",
        table(["model", "k", "(b) sorted / ideal", "ideal ms"], steps) if steps else "(not measured)",
        "## Compiled live model: graphs and recompiles",
        comp_note,
        "Graphs: compiled while timing (one per sub-model and mode); recompiles: new graphs while then switching "
        "through the sub-models three more times (forward, backward, forward order).",
        table(["model", "mode", "sub-models", "graphs", "recompiles switching back"], comp_rows)
        if comp_rows else "(none)",
        "## Where the worst gaps go (self time per op, per call)",
        ("`torch.profiler` self CPU time (wall-clock)" if torch_profiler else
         "Each aten op's thread CPU time, forward and backward kernels (a `TorchDispatchMode` timing every op "
         "with `time.thread_time`, less the timing's own per-call cost; `torch.profiler` records wall-clock, "
         "which on a shared, loaded machine "
         "mostly measures preemption: `--torch-profiler` uses it anyway)")
        + "; medians of 7 alternating calls. `outside ops` is the rest of the call's thread CPU time: Python "
        "(sliced attribute reads, module calls), the autograd engine and dispatch. Each breakdown is a separate, "
        "smaller measurement than the tables above (every op timed, which slows both sides): its totals give "
        "another ratio than the headline one it explains; read it for where the difference goes, not its size.",
        *prof,
    ]) + "\n"
    return text


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="fewer sub-models and repeats (about 2 minutes)")
    g = ap.add_mutually_exclusive_group()
    g.add_argument("--compile-all", action="store_true", help="also compile the CNN, ViT and Llama rows")
    g.add_argument("--no-compile", action="store_true", help="skip every compiled row")
    ap.add_argument("--torch-profiler", action="store_true", help="gap tables from torch.profiler (wall-clock)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: steadier ratios on a shared machine)")
    ap.add_argument("--device", default="cpu", help="where models and inputs live: cpu (default) or cuda")
    ap.add_argument("--repeat", type=int, default=0,
                    help="round-robin repeats (default 15, --quick 7; inference and decoding twice as many)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    text = run(args.quick, "none" if args.no_compile else "all" if args.compile_all else "default",
               args.torch_profiler, args.repeat, args.device)
    print(text)
    suffix = "" if torch.device(args.device).type == "cpu" else f"_{torch.device(args.device).type}"
    print("wrote", write(f"overhead{'_quick' if args.quick else ''}{suffix}.md", text))
