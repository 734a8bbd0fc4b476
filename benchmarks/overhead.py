"""Overhead of running a sub-model inside the wrapped model vs a standalone
model of the same size (issue 2's performance section).

Every ratio is measured side by side in one run (round-robin timing, median).

    python benchmarks/overhead.py [--quick]

Writes benchmarks/results/overhead.md.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from common import interleaved, table, write  # noqa: E402

import sortednet as sn  # noqa: E402


class FFNStack(nn.Module):
    def __init__(self, d: int = 256, ffn: int = 1024, n: int = 4):
        super().__init__()
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(d, ffn), nn.ReLU(), nn.Linear(ffn, d)) for _ in range(n))

    def forward(self, x):
        for b in self.blocks:
            x = x + b(x)
        return x


class Attn(nn.Module):
    def __init__(self, d: int, heads: int, head_dim: int):
        super().__init__()
        self.num_heads, self.head_dim = heads, head_dim
        self.q, self.k, self.v = (nn.Linear(d, heads * head_dim) for _ in range(3))
        self.o = nn.Linear(heads * head_dim, d)

    def forward(self, x):
        B, T, _ = x.shape
        q, k, v = (p(x).view(B, T, self.num_heads, self.head_dim).transpose(1, 2) for p in (self.q, self.k, self.v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o(y.transpose(1, 2).reshape(B, T, self.num_heads * self.head_dim))


class Block(nn.Module):
    def __init__(self, d: int, heads: int, head_dim: int, ffn: int):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = Attn(d, heads, head_dim)
        self.fc1, self.fc2 = nn.Linear(d, ffn), nn.Linear(ffn, d)

    def forward(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class BlockStack(nn.Module):
    def __init__(self, d: int = 256, heads: int = 8, head_dim: int = 32, ffn: int = 1024, n: int = 3):
        super().__init__()
        self.blocks = nn.ModuleList(Block(d, heads, head_dim, ffn) for _ in range(n))

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        return x


def setups(quick: bool):
    ffn_sizes = [128, 256, 512, 1024]
    yield ("mlp_stack", lambda **s: FFNStack(ffn=s.get("ffn", 1024)),
           lambda: [sn.Width("ffn", ffn_sizes, out="blocks.*.0", inp="blocks.*.2")],
           torch.randn(256, 256), [{"ffn": s} for s in ffn_sizes])
    yield ("transformer_stack", lambda **s: BlockStack(heads=s.get("heads", 8), ffn=s.get("ffn", 1024)),
           lambda: [sn.Heads("heads", [2, 4, 8], attn="blocks.*.attn"),
                    sn.Width("ffn", [256, 512, 1024], out="blocks.*.fc1", inp="blocks.*.fc2")],
           torch.randn(8, 64, 256), [{"heads": 2, "ffn": 256}, {"heads": 4, "ffn": 512}, {"heads": 8, "ffn": 1024}])


def mask_hooks(model: nn.Module, sub: dict) -> None:
    """Masking baseline: full-size compute with the unused units zeroed."""
    for name, m in model.named_modules():
        if "ffn" in sub and (name.endswith(".0") or name.endswith("fc1")) and isinstance(m, nn.Linear):
            mask = (torch.arange(m.out_features) < sub["ffn"]).float()
            m.register_forward_hook(lambda mod, inp, out, mask=mask: out * mask)
        if "heads" in sub and name.endswith("attn.o"):
            mask = (torch.arange(m.in_features) < sub["heads"] * 32).float()
            m.register_forward_pre_hook(lambda mod, args, mask=mask: (args[0] * mask,))


def fwd_bwd(model: nn.Module, x: torch.Tensor):
    model(x).square().mean().backward()


def run(quick: bool) -> str:
    torch.manual_seed(0)
    repeat = 7 if quick else 15
    rows_a, rows_b = [], []
    for name, build, dims, x, subs in setups(quick):
        model = build()
        nest = sn.wrap(model, *dims())
        subs = [nest.resolve(s) for s in subs]  # SubModel objects, as a sampler hands them out
        fns_train, fns_inf, standalone = {}, {}, {}
        for s in subs:
            key = ",".join(f"{k}={v}" for k, v in s.items())
            alone = build(**s)
            masked = build()
            mask_hooks(masked, s)
            standalone[key] = alone
            exported = nest.export(s)

            def live_train(s=s):
                with nest.use(s):
                    fwd_bwd(model, x)

            def live_inf(s=s):
                with nest.use(s), torch.no_grad():
                    model(x)

            fns_train[f"live|{key}"] = live_train
            fns_train[f"alone|{key}"] = lambda a=alone: fwd_bwd(a, x)
            fns_train[f"mask|{key}"] = lambda m=masked: fwd_bwd(m, x)
            fns_inf[f"live|{key}"] = live_inf
            fns_inf[f"alone|{key}"] = lambda a=alone: a(x)
            fns_inf[f"export|{key}"] = lambda e=exported: e(x)
        # one sorted training step: k sub-models accumulated + one optimizer step
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        full_opt_model = build()
        full_opt = torch.optim.AdamW(full_opt_model.parameters(), lr=1e-4)
        for p in full_opt_model.parameters():
            p.grad = torch.zeros_like(p)

        def sorted_step():
            for s in subs:
                with nest.use(s):
                    (model(x).square().mean() / len(subs)).backward()
            opt.step()
            # keep .grad allocated: with set_to_none the next call's first backward would pay the
            # full-size allocation, and in this round-robin that lands on whichever sub-model runs next
            opt.zero_grad(set_to_none=False)

        def ideal_step():
            for a in standalone.values():
                fwd_bwd(a, x)
            full_opt.step()
            full_opt.zero_grad(set_to_none=False)

        fns_train["step|sorted"] = sorted_step
        fns_train["step|ideal"] = ideal_step
        with torch.no_grad():
            t_inf = interleaved(fns_inf, repeat=repeat * 2)
        t_tr = interleaved(fns_train, repeat=repeat)
        for s in subs:
            key = ",".join(f"{k}={v}" for k, v in s.items())
            alone = t_tr[f"alone|{key}"]
            rows_a.append([name, key, t_tr[f"live|{key}"] / alone, t_tr[f"mask|{key}"] / alone,
                           t_inf[f"live|{key}"] / t_inf[f"alone|{key}"], t_inf[f"export|{key}"] / t_inf[f"alone|{key}"],
                           alone * 1e3])
        rows_b.append([name, len(subs), t_tr["step|sorted"] / t_tr["step|ideal"], t_tr["step|ideal"] * 1e3])
    a = [r[2] for r in rows_a]
    inf = [r[4] for r in rows_a]
    exp = [r[5] for r in rows_a]
    summary = table(["measure", "median", "worst", "target"], [
        ["(a) train fwd+bwd live / standalone", statistics.median(a), max(a), "median <= 1.10, worst <= 1.25"],
        ["(b) sorted step / ideal", statistics.median(r[2] for r in rows_b), max(r[2] for r in rows_b), "<= 1.15"],
        ["(c) inference live / standalone", statistics.median(inf), max(inf), "<= 1.10"],
        ["(c) inference exported / standalone", statistics.median(exp), max(exp), "<= 1.02"],
    ])
    text = "\n\n".join([
        "# Overhead of sub-models in the wrapped model vs standalone models",
        f"Command: `python benchmarks/overhead.py{' --quick' if quick else ''}`; torch {torch.__version__}, "
        f"{platform.machine()}, {torch.get_num_threads()} threads; medians of {repeat} round-robin repeats.",
        "## Summary", summary,
        "## Per sub-model (ratios to a standalone model of the same size)",
        table(["model", "sub-model", "(a) train live", "(d) train masked", "(c) infer live", "(c) infer exported",
               "standalone train ms"], rows_a),
        "## One sorted training step (all listed sub-models accumulated + AdamW step)",
        table(["model", "k", "(b) sorted / ideal", "ideal ms"], rows_b),
    ]) + "\n"
    return text


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: steadier ratios on a shared machine)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    text = run(args.quick)
    print(text)
    print("wrote", write("overhead.md", text))
