"""Sorted fine-tuning of a small GPT-2: nest, sort by importance, SoFT, pick, export, reload, generate.

Runs on CPU in a few minutes (no downloads): a character-level GPT-2 is first
"pretrained" on Python's own documentation text (``pydoc_data.topics``),
then made nested along FFN width, attention heads and depth, importance-
sorted, and fine-tuned with SoFT (all depth exits in one pass) while a
sampler draws the width/heads sub-models of each step.

    PYTHONPATH=src python examples/soft_gpt.py [--steps 300]
"""

from __future__ import annotations

import argparse
import tempfile
from pydoc_data.topics import topics

import torch

try:
    from transformers import GPT2Config, GPT2LMHeadModel
except ImportError as e:  # (an optional extra)
    raise SystemExit(f"this example needs transformers: pip install 'sortednet[transformers]' ({e})") from e

import sortednet as sn
from sortednet.integrations import export_pretrained, soft_loss


def data(ctx: int, batch: int, steps: int, seed: int):
    text = "\n".join(topics[k] for k in sorted(topics))
    stoi = {c: i for i, c in enumerate(sorted(set(text)))}
    ids = torch.tensor([stoi[c] for c in text])
    cut = int(0.9 * len(ids))
    g = torch.Generator().manual_seed(seed)

    def draw(part: torch.Tensor, n: int):
        starts = torch.randint(0, len(part) - ctx, (n, batch), generator=g)
        return [torch.stack([part[s:s + ctx] for s in row]) for row in starts]

    return draw(ids[:cut], steps), draw(ids[cut:], 10), stoi


@torch.no_grad()
def val_loss(model, val) -> float:
    model.eval()
    loss = sum(model(input_ids=x, labels=x).loss.item() for x in val) / len(val)
    model.train()
    return loss


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=300, help="steps of pretraining and of SoFT fine-tuning")
    args = ap.parse_args()
    if args.steps < 1:
        ap.error(f"--steps must be at least 1, got {args.steps}")
    torch.manual_seed(0)
    torch.set_num_threads(1)  # tiny matrices: more threads only add synchronisation
    train, val, stoi = data(ctx=64, batch=16, steps=2 * args.steps, seed=0)
    itos = {i: c for c, i in stoi.items()}
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(stoi), n_embd=64, n_layer=4, n_head=4, n_positions=128,
                                       bos_token_id=None, eos_token_id=None))  # characters only

    # 1. "pretrain" the plain model (stands in for a downloaded checkpoint)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for x in train[: args.steps]:
        model(input_ids=x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad()
    print(f"pretrained: val loss {val_loss(model, val):.3f}")

    # 2. nest it: FFN width, whole heads, depth; then most important neurons / heads first
    nest = sn.from_transformers(model, ffn=[0.5], heads=[2], depth=[2])
    sn.sort_by_importance(nest, train[:4], optimizer=opt)  # (its moments move with the units)
    print(nest)

    # 3. SoFT: both depth exits in one forward; width/heads sub-models from a sampler
    full_depth = [s for s in nest.submodels if s["depth"] == 4]
    sampler = sn.Sampler(full_depth, k=2, strategy="sandwich", seed=0)
    opt = torch.optim.AdamW(nest.trainable_parameters(), lr=1e-3)
    for step, x in enumerate(train[args.steps:]):
        sn.accumulate(nest, sampler.draw(step), lambda x=x: soft_loss(nest, x).loss)
        opt.step()
        opt.zero_grad()
    for sub in nest.submodels:
        with nest.use(sub):
            print(f"{str(sub):28s} params {nest.cost(sub):7d}  val loss {val_loss(model, val):.3f}")

    # 4. pick by budget, export a standard GPT2LMHeadModel, reload it, generate
    sub = nest.pick(fraction=0.6)
    if sub["heads"] < 4:  # GPT-2 configs cannot describe fewer heads of the same size: the largest sub-model
        budget = 0.6 * nest.cost(nest.largest)  # with every head that fits the same budget
        sub = max((s for s in nest.submodels if s["heads"] == 4 and nest.cost(s) <= budget), key=nest.cost)
    with tempfile.TemporaryDirectory() as tmp:
        export_pretrained(nest, sub).save_pretrained(tmp)
        small = GPT2LMHeadModel.from_pretrained(tmp).eval()
    prompt = torch.tensor([[stoi[c] for c in "The import statement"]])
    out = small.generate(prompt, max_new_tokens=60, do_sample=False)
    print(f"exported {sub} ({sum(p.numel() for p in small.parameters())} params):")
    print("".join(itos[int(i)] for i in out[0]))


if __name__ == "__main__":
    main()
