"""`sn.discover` on real timm architectures: groups found, every checked sub-model's export equal to its live
output, parameter counts, importance sorting keeping the full model.

Models are built from timm's own code with random weights (``pretrained=False``: nothing is downloaded), in eval
mode. timm imports a few torchvision names at import time (``FrozenBatchNorm2d``, transforms, datasets) but none
of the architectures below calls torchvision. Where torchvision cannot be imported (here: PyPI's build for torch
2.13 is a CUDA build that fails next to the CPU torch), ``--stand-in`` registers a minimal stand-in module for
those import-time names only; results then say so.

    pip install --no-deps timm          # (timm's own requirement pulls torchvision)
    .venv/bin/python benchmarks/timm_discover.py --stand-in      # -> benchmarks/results/timm_discover.md/.json

Per model: discover at ratios 0.25 / 0.5 / 1 → wrap with ``example=`` (``nest.check``: a dry run of small, large
and mixed sub-models) → importance sorting (``bn`` where the model has BatchNorm, else ``l1``) and the full
model's change → the sub-models every group at one ratio (``sn.by_ratio``) plus 5 random mixes: live output vs
``export(sub)``, and ``cost(sub)`` vs the exported model's parameter count.
"""

from __future__ import annotations

import argparse
import enum
import json
import os
import random
import sys
import time
import types

import torch
from torch import nn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "src"))

import sortednet as sn  # noqa: E402
from sortednet.importance import sort_units  # noqa: E402

RESULTS = os.path.join(ROOT, "benchmarks", "results")
MODELS = ["resnet18", "resnet50", "mobilenetv2_050", "mobilenetv3_small_100", "efficientnet_b0", "convnext_atto",
          "regnetx_002", "densenet121", "ghostnet_100", "vit_tiny_patch16_224", "deit_tiny_distilled_patch16_224",
          "swin_tiny_patch4_window7_224", "mixer_s16_224", "levit_128s", "poolformer_s12", "cait_xxs24_224",
          "beit_base_patch16_224"]
#: models that take img_size= (run at 64 px); the others with fixed position tables run at 224
SIZED = ("vit_", "deit_", "mixer_", "cait_", "beit_")


def stand_in_torchvision() -> None:
    """Register a stand-in ``torchvision`` with the names timm imports at import time (no model uses them)."""

    class FrozenBatchNorm2d(nn.Module):
        def __init__(self, n: int, eps: float = 1e-5) -> None:
            super().__init__()
            for name, fill in (("weight", 1.0), ("bias", 0.0), ("running_mean", 0.0), ("running_var", 1.0)):
                self.register_buffer(name, torch.full((n,), fill))
            self.eps = eps

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            scale = self.weight * (self.running_var + self.eps).rsqrt()
            return x * scale[:, None, None] + (self.bias - self.running_mean * scale)[:, None, None]

    class InterpolationMode(enum.Enum):
        NEAREST, NEAREST_EXACT, BILINEAR, BICUBIC = "nearest", "nearest-exact", "bilinear", "bicubic"
        BOX, HAMMING, LANCZOS = "box", "hamming", "lanczos"

    class Unused:
        def __init__(self, *args: object, **kwargs: object) -> None:
            raise RuntimeError("torchvision stand-in: not available in this benchmark")

    def module(name: str, **attrs: object) -> types.ModuleType:
        m = types.ModuleType(name)
        m.__dict__.update(attrs)
        m.__getattr__ = lambda n: (_ for _ in ()).throw(AttributeError(n)) if n.startswith("__") else Unused
        m.__path__ = []
        sys.modules[name] = m
        return m

    tv = module("torchvision", __version__="0.0+stand-in")
    tv.ops = module("torchvision.ops")
    tv.ops.misc = module("torchvision.ops.misc", FrozenBatchNorm2d=FrozenBatchNorm2d)
    tv.transforms = module("torchvision.transforms", InterpolationMode=InterpolationMode)
    tv.transforms.functional = module("torchvision.transforms.functional", InterpolationMode=InterpolationMode)
    tv.datasets = module("torchvision.datasets")
    tv.models = module("torchvision.models")
    tv.models.feature_extraction = module("torchvision.models.feature_extraction")


def measure(timm: types.ModuleType, name: str, mixes: int = 5) -> dict:
    torch.manual_seed(0)
    kw = {"img_size": 64} if name.startswith(SIZED) else {}
    model = timm.create_model(name, pretrained=False, num_classes=10, **kw).eval()
    with torch.no_grad():  # timm zero-initialises some classifier heads (MLP-Mixer): an all-zero output tells nothing
        for p in model.parameters():
            if p.dim() > 1 and not p.any():
                p.normal_(0, 0.02)
    res = 64 if kw or not any(k in name for k in ("swin", "levit")) else 224
    x = torch.randn(2, 3, res, res)
    with torch.no_grad():
        ref = model(x)
    row: dict = {"model": name, "input": list(x.shape), "params": sum(p.numel() for p in model.parameters())}
    t0 = time.perf_counter()
    dims = sn.discover(model, x, ratios=[0.25, 0.5, 1.0])
    row["discover_s"] = time.perf_counter() - t0
    row["groups"] = sum(isinstance(d, sn.Width) for d in dims)
    row["heads"] = sum(isinstance(d, sn.Heads) for d in dims)
    if not dims:
        return row
    rng = random.Random(0)
    subs = sn.by_ratio(dims, [0.25, 0.5, 1.0]) + [{d.name: rng.choice(d.sizes) for d in dims} for _ in range(mixes)]
    t0 = time.perf_counter()
    nest = sn.wrap(model, *dims, submodels=subs, example=x)
    row["wrap_check_s"] = time.perf_counter() - t0
    row["sort"] = "l1"  # (BatchNorm's gamma is 1 everywhere at init: "bn" would keep every order)
    orders = sort_units(nest, row["sort"], example=x)
    row["groups_permuted"] = sum(not torch.equal(torch.as_tensor(o), torch.arange(len(o))) for o in orders.values())
    with torch.no_grad():
        row["sorted_full_change"] = (model(x) - ref).abs().max().item() / ref.abs().max().item()
    worst, cost_ok = 0.0, True
    for sub in nest.submodels:
        with torch.no_grad(), nest.use(sub):
            live = model(x)
        small = nest.export(sub).eval()
        with torch.no_grad():
            worst = max(worst, (small(x) - live).abs().max().item())
        cost_ok &= sum(p.numel() for p in small.parameters()) == nest.cost(sub)
    row.update(submodels=len(nest.submodels), export_max_diff=worst, cost_equals_export=cost_ok,
               smallest=nest.cost(nest.submodels[0]), largest=nest.cost(nest.submodels[-1]))
    return row


def render(out: dict) -> str:
    lines = ["# `sn.discover` on real timm architectures", "",
             f"Written by `benchmarks/timm_discover.py` (timm {out['timm']}, torch {out['torch']}"
             + (", torchvision replaced by the script's import-time stand-in" if out["stand_in"] else "")
             + "). Random weights (weight matrices timm initialises to zero drawn from N(0, 0.02)), eval mode, "
             "CPU. Per model: discover at ratios 0.25/0.5/1, wrap with `example=` (the dry-run check), importance "
             "sorting, then the sub-models at one ratio for every group plus 5 random mixes, each exported and "
             "compared with its live output.", "",
             "| model | params | Width groups | Heads | sub-models checked | export vs live (max abs) "
             "| cost = exported params | smallest / largest params "
             "| sorting: groups reordered, full-model change (relative) | discover s | wrap+check s |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in out["rows"]:
        if "error" in r:
            lines.append(f"| {r['model']} | | error: {r['error']} | | | | | | | | |")
            continue
        if not r.get("groups") and not r.get("heads"):
            lines.append(f"| {r['model']} | {r['params']:,} | 0 | 0 | – | – | – | – | – | {r['discover_s']:.1f} | – |")
            continue
        lines.append(f"| {r['model']} | {r['params']:,} | {r['groups']} | {r['heads']} | {r['submodels']} | "
                     f"{r['export_max_diff']:.1e} | {'yes' if r['cost_equals_export'] else '**NO**'} | "
                     f"{r['smallest']:,} / {r['largest']:,} ({r['smallest'] / r['largest']:.0%}) | "
                     f"{r['sort']}: {r['groups_permuted']}, {r['sorted_full_change']:.1e} | {r['discover_s']:.1f} | "
                     f"{r['wrap_check_s']:.1f} |")
    ok = [r for r in out["rows"] if r.get("submodels")]
    bad = [r["model"] for r in ok if r["export_max_diff"] > 1e-4 or not r["cost_equals_export"]
           or r["sorted_full_change"] > 1e-5]
    none = [r["model"] for r in out["rows"] if "error" in r or not r.get("submodels")]
    lines += ["", f"Models with a nest: {len(ok)} of {len(out['rows'])}"
              + (f" (none found or an error: {', '.join(none)})" if none else "") + ". "
              + ("Every checked sub-model's export equals its live output (≤ 1e-4), every cost equals the exported "
                 "parameter count, and sorting changed no full model by more than 1e-5." if not bad else
                 f"**Failing**: {', '.join(bad)}."), ""]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="*", default=MODELS)
    ap.add_argument("--stand-in", action="store_true", help="a torchvision stand-in where it cannot be imported")
    args = ap.parse_args()
    torch.set_num_threads(1)
    stand_in = False
    try:
        import torchvision  # noqa: F401
    except Exception as e:
        if not args.stand_in:
            raise SystemExit("torchvision cannot be imported; rerun with --stand-in (see the module docstring)") from e
        stand_in_torchvision()
        stand_in = True
    try:
        import timm
    except ImportError:
        raise SystemExit("timm is not installed: pip install --no-deps timm") from None
    rows = []
    for name in args.models:
        try:
            rows.append(measure(timm, name))
        except Exception as e:  # reported in the table, the other models still run
            rows.append({"model": name, "error": f"{type(e).__name__}: {str(e)[:200]}"})
        print(rows[-1], flush=True)
    out = {"timm": timm.__version__, "torch": torch.__version__, "stand_in": stand_in, "rows": rows}
    os.makedirs(RESULTS, exist_ok=True)
    with open(os.path.join(RESULTS, "timm_discover.json"), "w") as f:
        json.dump(out, f, indent=1)
    text = render(out)
    with open(os.path.join(RESULTS, "timm_discover.md"), "w") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    main()
