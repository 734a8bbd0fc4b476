"""Weight layout study: input-feature slices ``W[:, :h]`` of ``nn.Linear`` weights.

A slice ``W[:, :h]`` of a row-major ``(out, in)`` weight is a strided view. Two
layouts are compared, side by side in one run (round robin, medians, 1 thread):

- ``row``: the user's layout (``(out, in)`` contiguous): what sortednet runs today;
- ``col``: the same Parameter object re-laid as the transpose of a contiguous ``(in, out)``
  storage (``p.data = p.data.t().contiguous().t()``): ``W[:, :h]`` is then a dense block
  read with BLAS's transpose flag. ``state_dict`` keys, shapes and values are unchanged.

Three levels: single ops (forward matmul, input gradient, adding the weight gradient into
the slice of ``.grad``), one wrapped layer, and whole stacks (the MLP / transformer stacks
of ``benchmarks/overhead.py``), each as a ratio to a standalone layer / model of the size.

    python benchmarks/layout.py [--quick]

Writes benchmarks/results/layout.md (``--quick``: layout_quick.md).
"""

from __future__ import annotations

import argparse
import platform
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from bench_models import BlockStack, FFNStack  # noqa: E402
from common import interleaved, table, write  # noqa: E402

import sortednet as sn  # noqa: E402
import sortednet.views as views  # noqa: E402
from sortednet.views import _add, new_lock  # noqa: E402


def col_major(model: nn.Module, names: list[str]) -> None:
    """Re-lay the weights of the named ``nn.Linear`` modules as transposed contiguous storage
    (same Parameter objects, same values, same shapes)."""
    for n in names:
        p = model.get_submodule(n).weight
        with torch.no_grad():
            p.data = p.data.t().contiguous().t()


def ops(quick: bool) -> list[list]:
    """Single ops at shapes of the benchmark models (tokens x in -> out, h of in active)."""
    rows = []
    shapes = [(512, 1024, 256, 128), (512, 1024, 256, 512), (128, 4096, 1024, 1024)]
    if not quick:
        shapes += [(512, 256, 1024, 128), (128, 4096, 1024, 2048)]
    for tokens, full, out, h in shapes:
        x, go = torch.randn(tokens, h), torch.randn(tokens, out)
        w_row = torch.randn(out, full)
        w_col = w_row.t().contiguous().t()
        dense = w_row[:, :h].contiguous()
        g_row, g_col = torch.zeros_like(w_row), torch.zeros_like(w_col)
        # the weight gradient as mm's backward hands it for each layout (see docs/mechanism.md)
        gw_row_layout = (x.t() @ go).t()          # (out, h), column-major: W[:, :h] is not dense
        gw_col_layout = (x.t() @ go).t()          # identical values; the col storage slice is row-major
        fns = {
            "fwd|row": lambda: F.linear(x, w_row[:, :h]), "fwd|col": lambda: F.linear(x, w_col[:, :h]),
            "fwd|dense": lambda: F.linear(x, dense),
            "gin|row": lambda: go @ w_row[:, :h], "gin|col": lambda: go @ w_col[:, :h], "gin|dense": lambda: go @ dense,
            "gacc|row": lambda: g_row[:, :h].add_(gw_row_layout),
            "gacc|col": lambda: g_col[:, :h].add_(gw_col_layout),
            "gw|dense": lambda: x.t() @ go,
        }
        t = interleaved(fns, repeat=9 if quick else 21, clock=time.thread_time)
        rows.append([f"{tokens}x{h} -> {out} (of {full})",
                     t["fwd|row"] / t["fwd|dense"], t["fwd|col"] / t["fwd|dense"],
                     t["gin|row"] / t["gin|dense"], t["gin|col"] / t["gin|dense"],
                     t["gacc|row"] / t["gw|dense"], t["gacc|col"] / t["gw|dense"], t["fwd|dense"] * 1e3])
    return rows


def _fused(on: bool, fn):
    """``fn`` run with sortednet's fused nn.Linear gradient path on or off."""
    def run():
        views.FUSED_LINEAR = on
        try:
            fn()
        finally:
            views.FUSED_LINEAR = True
    return run


def live_vs_alone(build, dims, subs, x, relaid: list[str], repeat: int) -> list[list]:
    """Train fwd+bwd and inference of each sub-model in the user's layout with the fused Linear gradient
    path (what sortednet runs) and without it (view + blocked add), and in transposed storage (without it),
    as ratios to a standalone model."""
    torch.manual_seed(0)
    models = {}
    for layout in ("row", "fused", "col"):
        m = build()
        if layout == "col":
            col_major(m, relaid)
        models[layout] = (m, sn.wrap(m, *dims()))
    subs = [models["row"][1].resolve(s) for s in subs]
    train, infer = {}, {}
    for s in subs:
        alone = build(**s)
        train[f"alone|{s}"] = lambda a=alone: a(x).square().mean().backward()
        infer[f"alone|{s}"] = lambda a=alone: a(x)
        for layout, (m, nest) in models.items():
            def tr(m=m, nest=nest, s=s):
                with nest.use(s):
                    m(x).square().mean().backward()

            def inf(m=m, nest=nest, s=s):
                with nest.use(s):
                    m(x)

            train[f"{layout}|{s}"], infer[f"{layout}|{s}"] = _fused(layout == "fused", tr), inf
    t_tr = interleaved(train, repeat=repeat, clock=time.thread_time)
    with torch.no_grad():
        t_in = interleaved({k: f for k, f in infer.items() if not k.startswith("fused|")}, repeat=repeat,
                           clock=time.thread_time)
    rows = []
    for s in subs:
        a_tr, a_in = t_tr[f"alone|{s}"], t_in[f"alone|{s}"]
        rows.append([str(s), t_tr[f"row|{s}"] / a_tr, t_tr[f"fused|{s}"] / a_tr, t_tr[f"col|{s}"] / a_tr,
                     t_in[f"row|{s}"] / a_in, t_in[f"col|{s}"] / a_in, a_tr * 1e3])
    return rows


class _Into(torch.autograd.Function):
    """The in-place gradient path of sortednet, reproduced: a slice of ``w`` whose gradient is
    added straight into ``w.grad[slice]``; ``mode="copy"`` hands out a contiguous copy of the slice,
    ``"grad"`` a view whose column-major gradient is added in column blocks (what sortednet does:
    :func:`sortednet.views._add`)."""

    @staticmethod
    def forward(ctx, w, out, inp, mode):  # type: ignore[override]
        ctx.w, ctx.out, ctx.inp, ctx.mode = w, out, inp, mode
        v = w.detach()[:out, :inp]
        return v.contiguous() if mode == "copy" else v

    @staticmethod
    def backward(ctx, g):  # type: ignore[override]
        w = ctx.w
        if w.grad is None:
            w.grad = torch.zeros_like(w)
        if ctx.mode == "grad":
            _add(w.grad[: ctx.out, : ctx.inp], g)
        else:
            w.grad[: ctx.out, : ctx.inp].add_(g)
        return None, None, None, None


def layers(quick: bool) -> list[list]:
    """One linear layer sliced on its input features, its output features, or both (1/8 and 1/2 of
    full), trained (forward + backward into ``.grad``) with the weight read three ways."""
    rows = []
    repeat = 9 if quick else 21
    lock = new_lock()
    for out, full, tokens in [(256, 1024, 512), (1024, 4096, 128)]:
        w_row = torch.randn(out, full, requires_grad=True)
        w_col = torch.randn(full, out).t().requires_grad_()
        for role in ("inp", "out", "both"):
            for frac in (8, 2):
                o = out // frac if role != "inp" else out
                i = full // frac if role != "out" else full
                x = torch.randn(tokens, i)
                dense = torch.randn(o, i, requires_grad=True)
                fns = {"dense": lambda x=x, d=dense: F.linear(x, d).sum().backward(),
                       "row view": lambda x=x, o=o, i=i: F.linear(x, _Into.apply(w_row, o, i, "")).sum().backward(),
                       "row view, blocked add": lambda x=x, o=o, i=i: F.linear(
                           x, _Into.apply(w_row, o, i, "grad")).sum().backward(),
                       "row copy": lambda x=x, o=o, i=i: F.linear(x, _Into.apply(w_row, o, i, "copy")).sum().backward(),
                       "col view": lambda x=x, o=o, i=i: F.linear(x, _Into.apply(w_col, o, i, "")).sum().backward(),
                       "fused": lambda x=x, o=o, i=i: views.LinearInto.apply(
                           x, w_row, None, tuple(c for c in ((0, 0, o), (1, 0, i)) if c[2] != w_row.shape[c[0]]),
                           (), lock).sum().backward()}
                t = interleaved(fns, repeat=repeat, clock=time.thread_time)
                rows.append([f"{tokens}x{i} -> {o} (of {full} -> {out})", role,
                             *(t[k] / t["dense"] for k in ("row view", "row view, blocked add", "row copy",
                                                           "col view", "fused")), t["dense"] * 1e3])
    return rows


def stacks(quick: bool) -> list[list]:
    repeat = 7 if quick else 15
    rows = []
    ffn = [128, 256, 512, 1024]
    fc = [f"blocks.{i}.{j}" for i in range(4) for j in (0, 2)]
    for r in live_vs_alone(lambda **s: FFNStack(ffn=s.get("ffn", 1024)),
                           lambda: [sn.Width("ffn", ffn, out="blocks.*.0", inp="blocks.*.2")],
                           [{"ffn": s} for s in (ffn[:2] if quick else ffn)], torch.randn(256, 256),
                           [n for n in fc if n.endswith(".2")], repeat):
        rows.append(["mlp_stack", *r])
    lin = [f"blocks.{i}.{n}" for i in range(3) for n in ("attn.o", "fc2")]
    subs = [{"heads": 2, "ffn": 256}, {"heads": 4, "ffn": 512}, {"heads": 8, "ffn": 1024}]
    for r in live_vs_alone(lambda **s: BlockStack(heads=s.get("heads", 8), ffn=s.get("ffn", 1024)),
                           lambda: [sn.Heads("heads", [2, 4, 8], attn="blocks.*.attn"),
                                    sn.Width("ffn", [256, 512, 1024], out="blocks.*.fc1", inp="blocks.*.fc2")],
                           subs[:2] if quick else subs, torch.randn(8, 64, 256), lin, repeat):
        rows.append(["transformer_stack", *r])
    return rows


def run(quick: bool) -> str:
    torch.manual_seed(0)
    op_rows = ops(quick)
    layer_rows = layers(quick)
    stack_rows = stacks(quick)
    return "\n\n".join([
        "# Weight layout of input-sliced nn.Linear weights: row-major (the user's) vs transposed storage",
        f"Command: `python benchmarks/layout.py{' --quick' if quick else ''}`; torch {torch.__version__}, "
        f"{platform.machine()}, {torch.get_num_threads()} thread(s); "
        "medians of round-robin repeats of the thread's CPU time. "
        "`row`: the user's `(out, in)` layout, `W[:, :h]` a strided view; `col`: the same Parameter re-laid as "
        "the transpose of a contiguous `(in, out)` storage, `W[:, :h]` a dense block.",
        "## Single ops (ratio to the same op on a dense standalone weight)",
        "`gacc`: adding the weight gradient, as `mm`'s backward returns it, into the slice of `.grad` "
        "(what the in-place gradient path does), as a ratio to computing that gradient (`x.t() @ grad_out`).",
        table(["shape", "fwd row", "fwd col", "grad-in row", "grad-in col", "gacc row / gw", "gacc col / gw",
               "dense fwd ms"], op_rows),
        "## One linear layer, forward + backward (ratio to a dense weight of the active size)",
        "The in-place gradient path reproduced (gradient added into the slice of `.grad`): `row view` adds "
        "`mm`'s column-major weight gradient into the row-major slice as it comes (a transposing add), "
        "`row view, blocked add` adds it in blocks of 128 columns once it holds 2^18 elements (what sortednet "
        "does: the module reads a view of the parameter), `row copy` hands the matmul a contiguous copy of "
        "the slice (so `mm`'s backward "
        "returns the weight gradient in the slice's layout; the module then reads a copy, not the parameter), "
        "`col view` reads the re-laid storage. `fused`: sortednet's `nn.Linear` training path "
        "(`sortednet.views.LinearInto`): the view of the parameter in the user's layout, with the weight gradient "
        "accumulated into the slice of `.grad` by the GEMM itself (`addmm_`, row-major), no separate add.",
        table(["layer", "sliced", "row view", "row view, blocked add", "row copy", "col view", "fused",
               "dense train ms"], layer_rows),
        "## Stacks of benchmarks/overhead.py",
        "`train row`: the user's layout without the fused path (view + blocked add, "
        "`sortednet.views.FUSED_LINEAR = False`); `train fused`: what sortednet runs; `col`: input-sliced weights "
        "re-laid in transposed storage, without the fused path. Inference has no gradient path: row and col only.",
        table(["model", "sub-model", "train row", "train fused", "train col", "infer row", "infer col",
               "standalone train ms"], stack_rows),
    ]) + "\n"


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(1)
    text = run(args.quick)
    print(text)
    print("wrote", write("layout_quick.md" if args.quick else "layout.md", text))
