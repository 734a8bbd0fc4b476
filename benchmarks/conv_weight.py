"""How a sub-model's convolution reads an input-sliced weight in training: a strided view vs one contiguous copy.

``W[:o, :i]`` of a ``(out, in, kh, kw)`` convolution weight is a strided view. A convolution hands its weight
to its kernels contiguous, so the view is copied by the forward and copied again by the backward. sortednet's
``nn.Conv1d/2d/3d`` training path (``sortednet.views.SliceCopy``) reads it once as a contiguous copy that the
forward and the backward share, with the gradient added into the slice of ``.grad`` as before. This compares
the two, side by side in one run (round robin, medians of the thread's CPU time, 1 thread), as ratios to a
standalone layer / model of the sub-model's size:

- single ``nn.Conv2d`` layers wrapped by ``sn.wrap``, sliced on in and out channels, ResNet stage shapes;
- the ResNet-18 (BatchNorm) sub-models of ``benchmarks/overhead.py``.

``view``: ``sortednet.views.DENSE_CONV = False`` (the view path); ``copy``: the default.

    python benchmarks/conv_weight.py [--quick]

Writes benchmarks/results/conv_weight.md (``--quick``: conv_weight_quick.md).
"""

from __future__ import annotations

import argparse
import platform
import sys
import time

import torch
from torch import nn

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from common import interleaved, table, write  # noqa: E402

import sortednet as sn  # noqa: E402
import sortednet.views as views  # noqa: E402


def _switched(on: bool, fn):
    def f():
        views.DENSE_CONV = on
        try:
            fn()
        finally:
            views.DENSE_CONV = True
    return f


def _both_orders(view, copy, alone, repeat: int) -> dict[str, float]:
    """Seconds per call of each, as the mean of two round-robin runs in opposite view / copy order (the first
    live call after the standalone one ran ~15% faster in one order and the other alike: measured)."""
    a = interleaved({"view": view, "copy": copy, "alone": alone}, repeat=repeat, clock=time.thread_time)
    b = interleaved({"copy": copy, "view": view, "alone": alone}, repeat=repeat, clock=time.thread_time)
    return {k: (a[k] + b[k]) / 2 for k in a}


def layers(quick: bool) -> list[list]:
    """One 3x3 convolution of ``full`` channels, a sub-model of ``c`` in and out channels, batch 8."""
    rows = []
    shapes = [(32, 64, 32), (64, 128, 16), (128, 256, 8), (256, 512, 4), (128, 512, 8)]
    for c, full, hw in shapes[2:4] if quick else shapes:
        torch.manual_seed(0)
        m = nn.Sequential(nn.Conv2d(full, full, 3, padding=1))
        nest = sn.wrap(m, sn.Width("w", [c, full], out="0", inp="0"))
        alone = nn.Conv2d(c, c, 3, padding=1)
        x = torch.randn(8, c, hw, hw)

        def live():
            with nest.use({"w": c}):
                m(x).square().mean().backward()

        t = _both_orders(_switched(False, live), _switched(True, live),
                         lambda a=alone, x=x: a(x).square().mean().backward(), 9 if quick else 61)
        rows.append([f"{c} of {full} channels, {hw}x{hw}", t["view"] / t["alone"], t["copy"] / t["alone"],
                     t["alone"] * 1e3])
    return rows


def resnet(quick: bool) -> list[list]:
    from overhead import _cnn_vit_setups

    st = next(_cnn_vit_setups(quick))
    st.model.train()
    rows = []
    for s in st.subs:
        def live(s=s):
            with st.nest.use(s):
                st.train(st.model)

        t = _both_orders(_switched(False, live), _switched(True, live),
                         lambda a=st.alone[str(s)]: st.train(a.train()), 7 if quick else 31)
        rows.append([str(s), t["view"] / t["alone"], t["copy"] / t["alone"], t["alone"] * 1e3])
    return rows


def _verdict(rows: list[list]) -> str:
    """Where the copy is ahead of the view, from the rows (ratios in columns 1 and 2): a gain named only where
    there is one."""
    ahead = [r for r in rows if r[2] < r[1]]
    worst = max(rows, key=lambda r: r[2] - r[1])
    if not ahead:
        return (f"The copy is ahead in 0 of {len(rows)} rows; the largest loss: {worst[0]} "
                f"({worst[1]:.3f} -> {worst[2]:.3f}).")
    best = min(rows, key=lambda r: r[2] - r[1])
    last = "the largest loss" if worst[2] > worst[1] else "the smallest gain"
    return (f"The copy is ahead in {len(ahead)} of {len(rows)} rows; the largest gain: {best[0]} "
            f"({best[1]:.3f} -> {best[2]:.3f}), {last}: {worst[0]} ({worst[1]:.3f} -> {worst[2]:.3f}).")


def run(quick: bool) -> str:
    layer_rows = layers(quick)
    resnet_rows = resnet(quick)
    return "\n\n".join([
        "# Input-sliced convolution weights in training: a strided view vs one contiguous copy",
        f"Command: `python benchmarks/conv_weight.py{' --quick' if quick else ''}`; torch {torch.__version__}, "
        f"{platform.machine()}, {torch.get_num_threads()} thread(s); medians of round-robin repeats of the "
        "thread's CPU time, each the mean of two runs in opposite view / copy order (the first live call of a "
        "round ran faster in either order); forward + backward (gradients into `.grad`), as a ratio to a "
        "standalone layer / "
        "model of the sub-model's size. `view`: the weight read as a strided view of the parameter "
        "(`sortednet.views.DENSE_CONV = False`), which the convolution copies in its forward and again in its "
        "backward; `copy`: what sortednet runs, one contiguous copy (`views.SliceCopy`) shared by both.",
        "## One nn.Conv2d (3x3, batch 8), sliced in and out channels",
        table(["layer", "view", "copy", "standalone ms"], layer_rows),
        _verdict(layer_rows),
        "## ResNet-18 (BatchNorm) sub-models of benchmarks/overhead.py (input 8x3x64x64)",
        table(["sub-model", "view", "copy", "standalone ms"], resnet_rows),
        _verdict(resnet_rows),
    ]) + "\n"


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(1)
    text = run(args.quick)
    print(text)
    print("wrote", write("conv_weight_quick.md" if args.quick else "conv_weight.md", text))
