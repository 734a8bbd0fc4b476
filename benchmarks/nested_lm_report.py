"""Tables, targets and the Mix'n'Match plot of ``benchmarks/nested_lm.py`` (from its JSON results)."""

from __future__ import annotations

import json
import math
import os
from typing import Any

from common import table

TOL = 0.02  # target: every twin-matched sub-model within 2% of its twin's held-out loss
DOCS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "training.md")
BEGIN, END = "<!-- nested_lm:begin -->", "<!-- nested_lm:end -->"
BASE = "(a) sorted sandwich k=4"  # the options below are measured against it


def compute(res: dict[str, Any], name: str) -> float:
    """Training FLOPs of a method relative to training the largest model once (same steps)."""
    meta = res["meta"]
    fl, steps = meta["flops"], meta["cfg"]["steps"]
    largest = meta["twins"][-1]
    return sum(n * fl[k] for k, n in res["methods"][name]["passes"].items()) / (steps * fl[largest])


def front_violations(loss: dict[str, float], params: dict[str, int]) -> tuple[int, float, str]:
    """Sub-models worse than some smaller one: (count, worst excess, worst sub-model)."""
    subs = sorted(loss, key=lambda s: params[s])
    best, count, worst, at = math.inf, 0, 0.0, "-"
    for i, s in enumerate(subs):
        smaller = [loss[t] for t in subs[:i] if params[t] < params[s]]
        best = min(smaller) if smaller else math.inf
        if loss[s] > best:
            count += 1
            if loss[s] / best - 1 > worst:
                worst, at = loss[s] / best - 1, s
    return count, worst, at


def nested(res: dict[str, Any]) -> list[str]:
    """Methods that give every sub-model of the nest (all but the standalone twins)."""
    return [m for m in res["methods"] if not m.startswith("(b)")]


def twin_loss(res: dict[str, Any]) -> dict[str, float]:
    out = {}
    for name, r in res["methods"].items():
        if name.startswith("(b)"):
            out.update(r["loss"])
    full = res["methods"].get(res["meta"]["full"])
    if full is not None:
        out[res["meta"]["twins"][-1]] = full["loss"][res["meta"]["twins"][-1]]
    return out


def render(res: dict[str, Any], out_dir: str) -> None:
    """Write nested_lm.md and nested_lm.png under ``out_dir``."""
    meta = res["meta"]
    cfg, params, k = meta["cfg"], meta["params"], meta["k"]
    twins = twin_loss(res)
    nests = nested(res)
    subs = sorted(params, key=lambda s: params[s])
    short = {m: m.split(") ", 1)[-1] for m in res["methods"]}

    rows = []
    for t in meta["twins"]:
        if t not in twins:
            continue
        row = [f"`{t}`", f"{params[t]:,}", twins[t]]
        for m in nests:
            v = res["methods"][m]["loss"][t]
            row.append(f"{v:.4f} ({v / twins[t]:.3f})")
        rows.append(row)
    t1 = table(["sub-model", "params", "twin alone"] + [short[m] for m in nests], rows)

    rows = [[f"`{s}`", f"{params[s]:,}"] + [res["methods"][m]["loss"][s] for m in nests] for s in subs]
    t2 = table(["sub-model", "params"] + [short[m] for m in nests], rows)

    rows, twins_total, twins_sec = [], 0.0, 0.0
    for m, r in res["methods"].items():
        c = compute(res, m)
        passes = sum(r["passes"].values()) / cfg["steps"]
        rows.append([short[m], f"{passes:.2f}", f"{c:.2f}×", f"{r['sec']:.0f}"])
        if m.startswith("(b)") or m == meta["full"]:
            twins_total += c
            twins_sec += r["sec"]
    rows.append([f"all {len(twins)} twins together (b + c)", f"{len(twins):.2f}", f"{twins_total:.2f}×",
                 f"{twins_sec:.0f}"])
    t3 = table(["method", "sub-model passes per step", "training FLOPs ÷ largest once", "train seconds"], rows)

    rows = []
    for m in nests:
        loss = res["methods"][m]["loss"]
        ratios = {t: loss[t] / twins[t] for t in twins}
        worst = max(ratios, key=ratios.get)
        within = sum(v <= 1 + TOL for v in ratios.values())
        n, exc, at = front_violations(loss, params)
        c = compute(res, m)
        rows.append([short[m],
                     ("met" if within == len(ratios) else "**NOT met**") +
                     f" ({within}/{len(ratios)}; worst {ratios[worst]:.3f} `{worst}`)",
                     ("met" if n == 0 else "**NOT met**") + (f" ({n} of {len(loss)} worse than a smaller one; "
                                                             f"worst +{100 * exc:.1f}% `{at}`)" if n else ""),
                     ("met" if c <= k else "**NOT met**") + f" ({c:.2f}× ≤ {k}×)"])
    t4 = table(["method", f"every twin within {100 * TOL:.0f}%", "monotone loss-vs-params front",
                f"compute ≤ k={k}× largest"], rows)

    wall = meta["wall_s"]
    text = (
        "# Nested Llama LM: FFN width × heads × depth vs twins trained alone\n\n"
        "Written by `benchmarks/nested_lm.py` from `nested_lm.json`"
        + (" (**--quick smoke run: not a result**)" if meta.get("quick") else "") + "; the main run: "
        + (f"`{meta['command']}`" if meta.get("command") else
           "(its stored configuration as a command) `python benchmarks/nested_lm.py " + " ".join(
               f"--{k.replace('_', '-')} {v}" for k, v in cfg.items()
               if k not in ("json", "merge", "render", "recount_flops") and v is not None) + "`") + ". "
        f"Character-level `LlamaForCausalLM` from a config ({cfg['layers']} layers, hidden {cfg['hidden']}, "
        f"FFN {4 * cfg['hidden']}, {cfg['heads']} query heads / {cfg['kv_heads']} key-value heads) on "
        "`pydoc_data.topics` (last 10% held out), nested by `sn.from_transformers` over ffn × heads × depth: "
        f"{len(params)} sub-models. Every method: the same {cfg['steps']} optimizer steps × {cfg['batch']} × "
        f"{cfg['ctx']} characters in the same order, AdamW lr {cfg['lr']} with warmup + cosine, gradient clip 1.0, "
        f"one thread per method. Held-out loss: nats/char over {cfg['val_batches']} held-out batches. The run took "
        f"{wall / 60:.1f} min wall with `--jobs {cfg['jobs']}` on a 2-core machine shared with other jobs "
        "(`nice -n 10`); train seconds below include that contention."
        + "".join(f" Merged from a separate run (`--methods ... --json`, then `--merge`; {m['wall_s'] / 60:.1f} min "
                  f"wall, at the same time as the main run): {', '.join(m['methods'])}."
                  for m in meta.get("merged", ())) + "\n\n"
        "Methods: (a) sortednet: `sn.Sampler` + `sn.accumulate` over all sub-models (`+ SoFT depth`: the sampler "
        "draws ffn × heads at full depth and `soft_loss` reads the depth exits in the same pass; "
        + ("`+ distill`: " f"`sn.Distill(alpha={cfg['distill_alpha']})`, the largest drawn sub-model's logits teach "
           "the others; " if any("distill" in n for n in res["methods"]) else "")
        + ("`loss weights ∝ params`: `sn.Sampler(nest, ..., loss_weights=\"cost\")`, each drawn sub-model's loss "
           "weighted by its parameter count instead of the plain mean; " if any("∝ params" in n for n in res["methods"])
           else "")
        + "`loss weights small`: `loss_weights=\"small\"`, "
        "weights ∝ rank from the large end; `small first`: `sn.Sampler(..., small_first=steps // 3)`, small "
        "sub-models drawn more over the first third of the run); "
        "(b) twins: each a `LlamaForCausalLM` of exactly that sub-model's shapes, trained alone; "
        "(c) the full model trained alone and then sliced (also the largest twin); "
        "(d) MatFormer: FFN granularities only, all three every step (heads and depth never trained smaller).\n\n"
        "## Twin-matched sub-models: held-out loss (ratio to the twin)\n\n" + t1 +
        "\n\n## Compute\n\nForward FLOPs of the passes each method ran (torch's FlopCounterMode per sub-model, "
        "attention on the math kernel so its score matmuls count, × passes), relative to the same number of "
        "steps of the largest model alone; backward is ~2× forward for every pass alike.\n\n" + t3 +
        f"\n\n## Targets\n\nEvery twin-matched sub-model within {100 * TOL:.0f}% of its twin's held-out loss; no "
        "sub-model of the nest worse than one with fewer parameters; compute ≤ k× training the largest once.\n\n"
        + t4 + "\n\n" + diagnosis(res) +
        "\n\n## Mix'n'Match: every sub-model of the nest\n\nAll sub-models, also those a method never trained "
        "(MatFormer trains 3 of them; the full-alone control none but the largest).\n\n" + t2 +
        "\n\n![held-out loss vs parameters](nested_lm.png)\n")
    block = summary(res)
    with open(os.path.join(out_dir, "nested_lm.md"), "w") as f:
        f.write(text.replace("## Twin-matched", "## Summary\n\n" + block + "\n\n## Twin-matched", 1))
    plot(res, out_dir, twins, nests, short)
    if not meta.get("quick") and os.path.exists(DOCS):
        write_docs(block, DOCS)
    print(text)


def diagnosis(res: dict[str, Any]) -> str:
    """Why targets are missed, computed from the results: twins out of size order, and the
    sub-models of the best sortednet method split by their attention-head count."""
    meta, params = res["meta"], res["meta"]["params"]
    twins = twin_loss(res)
    ts = sorted(twins, key=lambda t: params[t])
    inverted = [(a, b) for i, a in enumerate(ts) for b in ts[i + 1:] if twins[b] > twins[a]]
    sorted_methods = [m for m in nested(res) if m.startswith("(a)")]
    if not sorted_methods:
        return ""
    best = min(sorted_methods, key=lambda m: sum(res["methods"][m]["loss"][t] / twins[t] for t in twins))
    loss = res["methods"][best]["loss"]
    heads = sorted({int(s.split("heads=")[1].split(",")[0]) for s in loss})
    by = {h: [v for s, v in loss.items() if f"heads={h}," in s] for h in heads}
    mean = {h: sum(v) / len(v) for h, v in by.items()}
    worse = [t for t in loss if any(params[u] < params[t] and loss[u] < loss[t] for u in loss)]
    few = sum(f"heads={heads[0]}," in t for t in worse)
    pairs = len(ts) * (len(ts) - 1) // 2
    listed = "; ".join(f"`{a}` ({params[a]:,}) {twins[a]:.3f} vs `{b}` ({params[b]:,}) {twins[b]:.3f}"
                       for a, b in inverted)
    budget = (f"(1) the twins themselves, trained alone for {meta['cfg']['steps']} steps, are not ordered by size: "
              f"in {len(inverted)} of {pairs} pairs the larger one has the higher held-out loss ({listed}), so "
              "parameter count alone does not rank these shapes, "
              "and a monotone front over parameters is out of reach for any method that matches its twins; each "
              "nested sub-model also gets only a share of the steps." if inverted else
              f"(1) at {meta['cfg']['steps']} steps the twins are ordered by size (all {pairs} pairs), so the "
              "ratios compare converged-enough models; each nested sub-model still gets only a share of the "
              "steps and shares its weights with every larger one.")
    out = ("Why targets are missed where they are: " + budget + " (2) For the best sortednet method (" + best
           + "), the sub-models with "
           + " vs ".join(f"{h} query heads average {mean[h]:.3f}" for h in heads)
           + f" nats/char, and {few} of the {len(worse)} sub-models worse than a smaller one have {heads[0]} heads. "
           "A budget lookup should therefore pick "
           "by measured loss (`nest.profile(..., score=...)` then `nest.pick`), which keeps only the Pareto front.")
    return out


def summary(res: dict[str, Any]) -> str:
    """Per-method summary and the measured effect of each training option against plain sandwich."""
    meta, params, k = res["meta"], res["meta"]["params"], res["meta"]["k"]
    twins = twin_loss(res)
    small, large = meta["twins"][0], meta["twins"][-1]
    rows, ratio = [], {}
    for m in nested(res):
        loss = res["methods"][m]["loss"]
        r = {t: loss[t] / twins[t] for t in twins}
        ratio[m] = r
        n, _, _ = front_violations(loss, params)
        rows.append([m, f"{compute(res, m):.2f}×", f"{r[small]:.3f}", f"{r[large]:.3f}",
                     f"{sum(r.values()) / len(r):.3f}", f"{max(r.values()):.3f}",
                     f"{sum(v <= 1 + TOL for v in r.values())}/{len(r)}", f"{n}/{len(loss)}"])
    cfg = meta["cfg"]
    out = (f"Loss ratio = held-out loss ÷ that of the same-shape twin trained alone (below 1: better than the twin); "
           f"{cfg['steps']} steps × {cfg['batch']} × {cfg['ctx']} characters per method, {len(params)} sub-models "
           f"({params[small]:,} to {params[large]:,} parameters), {len(twins)} twins, k = {k}.\n\n"
           + table(["method", "FLOPs ÷ largest once", "smallest ÷ twin", "largest ÷ twin", "mean ÷ twin",
                    "worst ÷ twin", f"twins within {100 * TOL:.0f}%", "sub-models worse than a smaller one"], rows))
    rows = []
    for m in ratio:  # each option against the longest other method its name extends (sandwich, or + SoFT)
        bases = [b for b in ratio if b != m and m.startswith(b)]
        if not bases or not m.startswith(BASE):
            continue
        base = max(bases, key=len)
        d = {t: ratio[m][t] - ratio[base][t] for t in twins}
        rows.append([m[len(base):].strip(" ,+") or m, base.split(") ", 1)[-1], f"{100 * d[small]:+.1f}",
                     f"{100 * d[large]:+.1f}", f"{100 * sum(d.values()) / len(d):+.1f}"])
    if rows:
        out += ("\n\nEffect of each training option: change of the loss ratio against the same recipe without "
                "it, in percentage points (negative: closer to / better than the twin).\n\n"
                + table(["option", "against", "smallest", "largest", "mean over twins"], rows))
    return out


def write_docs(block: str, path: str) -> None:
    """Replace the text between the nested_lm markers of docs/training.md (nothing else)."""
    with open(path) as f:
        doc = f.read()
    if BEGIN not in doc or END not in doc:
        return
    head, rest = doc.split(BEGIN, 1)
    tail = rest.split(END, 1)[1]
    body = "\n<!-- rendered from benchmarks/results/nested_lm.json by benchmarks/nested_lm.py -->\n\n" + block + "\n\n"
    with open(path, "w") as f:
        f.write(head + BEGIN + body + END + tail)


def plot(res: dict[str, Any], out_dir: str, twins: dict[str, float], nests: list[str],
         short: dict[str, str]) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    params = res["meta"]["params"]
    fig = Figure(figsize=(8, 5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    marks = "osD^vP*X"
    for i, m in enumerate(nests):
        loss = res["methods"][m]["loss"]
        subs = sorted(loss, key=lambda s: params[s])
        ax.plot([params[s] for s in subs], [loss[s] for s in subs], marks[i % len(marks)], alpha=0.75,
                label=short[m], ms=5)
    ts = sorted(twins, key=lambda s: params[s])
    ax.plot([params[s] for s in ts], [twins[s] for s in ts], "k-", lw=2, label="twins trained alone")
    ax.set_xscale("log")
    ax.set_xlabel("parameters")
    ax.set_ylabel("held-out loss (nats/char)")
    top = max(twins.values()) * 1.25
    ax.set_ylim(min(min(r["loss"].values()) for r in res["methods"].values()) * 0.97, top)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title("nested char-level Llama on pydoc_data.topics (points above the top are cut off)")
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "nested_lm.png"), dpi=120)


def load(path: str) -> dict[str, Any]:
    with open(path) as f:
        return json.load(f)
