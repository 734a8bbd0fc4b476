"""Render the digits benchmark results (the JSON written by digits.py) as
markdown tables, a PNG plot, and the summary block of docs/training.md."""

from __future__ import annotations

import os
import re
import statistics

BEGIN, END = "<!-- digits:begin -->", "<!-- digits:end -->"
REF = "independent (reference)"


def _ms(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def per_sub(runs: list[dict]) -> dict[str, tuple[float, float]]:
    """Accuracy mean and std over seeds for every sub-model a method scored."""
    return {s: _ms([r["acc"][s] for r in runs]) for s in runs[0]["acc"]}


def summarise(arch: dict) -> list[dict]:
    """One row per method: compute, accuracy over all sub-models, ratios to the standalone twins."""
    steps, fl = arch["steps"], arch["flops"]
    largest = arch["submodels"][-1]
    ref = per_sub(arch["methods"][REF])
    rows = []
    for method, runs in arch["methods"].items():
        acc = per_sub(runs)
        means = {s: m for s, (m, _) in acc.items()}
        ratios = {s: means[s] / ref[s][0] for s in arch["twins"] if s in means}
        rows.append({
            "method": method,
            "passes": statistics.mean(r["passes"] for r in runs) / steps,
            "flops": statistics.mean(r["flops"] for r in runs) / (steps * fl[largest]),
            "n": len(means), "mean_acc": statistics.mean(means.values()), "worst_acc": min(means.values()),
            "largest": means.get(largest), "mean_ratio": statistics.mean(ratios.values()),
            "worst_ratio": min(ratios.values()), "worst_twin": min(ratios, key=ratios.get),
            "ok98": sum(v >= 0.98 for v in ratios.values()), "seconds": statistics.mean(r["seconds"] for r in runs),
        })
    return rows


def _ok(flag: bool) -> str:
    return "met" if flag else "**NOT met**"


def _pct(x: float | None) -> str:
    return "—" if x is None else f"{100 * x:.2f}%"


def summary_md(results: dict) -> str:
    k, lines = results["k"], []
    for arch in results["archs"].values():
        n = len(arch["submodels"])
        lines += [f"**{arch['name']}** ({n} sub-models, {arch['params'][arch['submodels'][0]]:,} to "
                  f"{arch['params'][arch['submodels'][-1]]:,} parameters; {arch['steps']} optimizer steps; "
                  f"{len(results['seeds'])} seeds; ratios against {len(arch['twins'])} standalone twins)", "",
                  "| method | sub-model passes ÷ largest once | FLOPs ÷ largest once | mean acc (all) | worst acc "
                  "(all) | largest acc | mean ratio to twin | worst ratio (sub-model) | twins ≥ 98% |",
                  "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
        rows = summarise(arch)
        for r in rows:
            lines.append(f"| {r['method']} | {r['passes']:.2f}× | {r['flops']:.2f}× | {_pct(r['mean_acc'])} "
                         f"({r['n']}) | {_pct(r['worst_acc'])} | {_pct(r['largest'])} | {r['mean_ratio']:.4f} | "
                         f"{r['worst_ratio']:.4f} (`{r['worst_twin']}`) | {r['ok98']}/{len(arch['twins'])} |")
        lines += ["", f"Targets for each sortednet method: every twin ≥ 98%, mean ratio ≥ 99%, compute ≤ k = "
                  f"{k}× training the largest once (FLOPs):", "",
                  "| method | every twin ≥ 98% | mean ≥ 99% | compute ≤ k× |", "| --- | --- | --- | --- |"]
        for r in rows:
            if r["method"].startswith("sortednet"):
                lines.append(f"| {r['method']} | {_ok(r['worst_ratio'] >= 0.98)} (worst {r['worst_ratio']:.4f}) | "
                             f"{_ok(r['mean_ratio'] >= 0.99)} ({r['mean_ratio']:.4f}) | "
                             f"{_ok(r['flops'] <= k)} ({r['flops']:.2f}×) |")
        lines.append("")
    return "\n".join(lines)


def twins_md(arch: dict) -> str:
    methods = list(arch["methods"])
    acc = {m: per_sub(arch["methods"][m]) for m in methods}
    ref = acc[REF]
    head = "| sub-model | params | " + " | ".join(methods) + " |"
    lines = [head, "| --- | ---: |" + " ---: |" * len(methods)]
    for s in arch["twins"]:
        cells = []
        for m in methods:
            mean, sd = acc[m][s]
            cells.append(f"{100 * mean:.2f} ± {100 * sd:.2f}" + ("" if m == REF else f" ({mean / ref[s][0]:.3f})"))
        lines.append(f"| `{s}` | {arch['params'][s]:,} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def all_md(results: dict) -> str:
    out = ["# Digits benchmark: every sub-model", "",
           "Test accuracy (%) mean ± std over seeds, written by `benchmarks/digits.py`.", ""]
    for arch in results["archs"].values():
        methods = [m for m in arch["methods"] if m != REF]
        acc = {m: per_sub(arch["methods"][m]) for m in methods}
        out += [f"## {arch['name']}", "", "| sub-model | params | MFLOPs (batch 64) | " + " | ".join(methods) + " |",
                "| --- | ---: | ---: |" + " ---: |" * len(methods)]
        for s in arch["submodels"]:
            out.append(f"| `{s}` | {arch['params'][s]:,} | {arch['flops'][s] / 1e6:.2f} | " + " | ".join(
                f"{100 * acc[m][s][0]:.2f} ± {100 * acc[m][s][1]:.2f}" for m in methods) + " |")
        out.append("")
    return "\n".join(out)


def plot(results: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    archs = list(results["archs"].values())
    fig, axes = plt.subplots(1, len(archs), figsize=(7 * len(archs), 5), squeeze=False)
    for ax, arch in zip(axes[0], archs):
        for m, runs in arch["methods"].items():
            acc = per_sub(runs)
            subs = [s for s in arch["submodels"] if s in acc]
            xs, ys = [arch["params"][s] for s in subs], [100 * acc[s][0] for s in subs]
            if m == REF:
                ax.plot(xs, ys, "k-o", ms=7, lw=1.5, label=m, zorder=5)
            else:
                ax.scatter(xs, ys, s=10, alpha=0.55, label=m)
        ax.set_xscale("log")
        ax.set_xlabel("parameters of the sub-model")
        ax.set_ylabel("test accuracy (%), mean over seeds")
        ax.set_title(f"{arch['name']}: {len(arch['submodels'])} sub-models, {arch['steps']} steps")
        lo = min(100 * m for runs in arch["methods"].values() for m, _ in per_sub(runs).values())
        ax.set_ylim(max(lo - 1, 50), 100)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(results: dict, out: str, docs: str | None = None) -> None:
    """Write digits.md, digits_all_submodels.md, digits.png under ``out``; refresh ``docs`` between markers."""
    summary = summary_md(results)
    md = ["# Digits benchmark", "",
          "Written by `python benchmarks/digits.py` (do not edit by hand). sklearn digits, fixed stratified 80/20 "
          f"split, batch 64, Adam lr 3e-3 with cosine decay, the same batches and number of optimizer steps for "
          f"every method; k = {results['k']} sub-models per step for the sortednet methods; seeds "
          f"{results['seeds']}; torch {results.get('torch', '?')}, 1 CPU thread, "
          f"{results.get('wall_seconds', 0) / 60:.1f} min in all.", "",
          "Compute counts sub-model forward+backward passes and their FLOPs (torch.utils.flop_counter, forward "
          "x 3 cancels), relative to training the largest model once for the same steps. Ratios divide a "
          "sub-model's accuracy (mean over seeds) by that of the same-size model trained alone (the reference).",
          "", "BatchNorm (the CNN): after training, every method recomputes BatchNorm statistics over one pass of "
          "the training set (forward only, no gradient): the nests per sub-model with `nest.calibrate`, each "
          "standalone twin the same way for itself. These forward passes are included in the FLOPs (a forward "
          "pass counts 1/3 of a training pass).",
          "", "## Summary", "", summary, ""]
    for arch in results["archs"].values():
        md += [f"## {arch['name']}: the {len(arch['twins'])} sub-models with a standalone twin", "",
               "Accuracy (%) mean ± std over seeds (ratio to the standalone twin).", "", twins_md(arch), ""]
    md += ["Every sub-model of every method: [digits_all_submodels.md](digits_all_submodels.md). "
           "Plot: [digits.png](digits.png).", ""]
    with open(os.path.join(out, "digits.md"), "w") as f:
        f.write("\n".join(md))
    with open(os.path.join(out, "digits_all_submodels.md"), "w") as f:
        f.write(all_md(results))
    plot(results, os.path.join(out, "digits.png"))
    if docs and os.path.exists(docs):
        text = open(docs).read()
        if BEGIN in text and END in text:
            note = ("The CNN has BatchNorm after each convolution, sliced with its channels; after training, "
                    "every method recomputes the statistics (per sub-model with `nest.calibrate`, each standalone "
                    "twin for itself), so the calibration is part of the recipe, not of one method. "
                    "`sortednet weighted small` draws k sub-models with probability ∝ rank from the large end, "
                    "favouring small sub-models (`Sampler(..., strategy=\"weighted\", weights=\"small\")`).")
            block = f"{BEGIN}\n<!-- rendered from benchmarks/results/digits.json by benchmarks/digits.py -->\n\n" \
                    f"{note}\n\n{summary}\n{END}"
            text = re.sub(re.escape(BEGIN) + ".*?" + re.escape(END), lambda _: block, text, flags=re.S)
            with open(docs, "w") as f:
                f.write(text)
    print(summary)
    print(f"wrote {out}/digits.md, digits_all_submodels.md, digits.png")
