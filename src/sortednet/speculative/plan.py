"""Input checks and the set-up of a speculative decoding run (no forward runs here).

Every check raises :class:`~sortednet.errors.SortedNetError` before any
model computes anything: a target that is not a causal LM, a draft larger
than the target or with another vocabulary, exits not ascending in depth or
differing in width, thresholds of the wrong length or outside ``[0, 1]``.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

import numpy as np
from torch import nn

from ..dims import Depth
from ..errors import SortedNetError
from ..kvcache import STATE_LAYER_TYPES, layer_types
from ..nest import Nest
from ..submodel import SubModel
from .stack import ForwardRunner, LayerRunner, Stack, layer_runner_problem

__all__ = ["Plan", "make_plan"]


@dataclass
class Plan:
    """Stacks to run: the target's output is ``bounds[-1]`` of ``target``; draft exit ``i`` is
    boundary ``exits[i][1]`` of stack ``exits[i][0]``. ``outer``: contexts entered once for the run."""

    target: Stack
    exits: list[tuple[Stack, int]]
    labels: list[str]
    thresholds: list[float]
    costs: list[float]            # a draft token at exit i, in target passes (for num_draft_tokens="auto")
    shared: bool
    outer: list[AbstractContextManager]
    models: list[nn.Module]
    vocab: int


@functools.cache
def _causal_lm_classes() -> frozenset[str]:
    try:
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    except ImportError:  # pragma: no cover
        return frozenset()
    names: set[str] = set()
    for v in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values():
        names.update([v] if isinstance(v, str) else v)
    return frozenset(names)


def _registered_causal_lms() -> tuple[type, ...]:
    """Classes registered with ``AutoModelForCausalLM.register`` (a model of one's own, remote code)."""
    try:
        from transformers import AutoModelForCausalLM
        extra = AutoModelForCausalLM._model_mapping._extra_content
    except (ImportError, AttributeError):  # pragma: no cover
        return ()
    return tuple(v for v in extra.values() if isinstance(v, type))


def _is_causal_lm(model: Any) -> bool:
    """A transformers causal LM: a ``PreTrainedModel`` of a causal-LM class name (or a subclass of one: ``class
    MyLlama(LlamaForCausalLM)``), a class registered with ``AutoModelForCausalLM``, or ``torch.compile`` of one."""
    cfg = getattr(model, "config", None)
    if not isinstance(model, nn.Module) or cfg is None or getattr(cfg, "is_encoder_decoder", False):
        return False
    inner = model._orig_mod if type(model).__name__ == "OptimizedModule" and \
        isinstance(getattr(model, "_orig_mod", None), nn.Module) else model  # (torch.compile(model))
    try:
        from transformers import PreTrainedModel
    except ImportError:  # pragma: no cover
        return False
    # (remote code imported as is: its own module, a transformers name; a module of one's own that takes the name
    # is no transformers model, nor follows its cache)
    named = any(c.__name__ in _causal_lm_classes() for c in type(inner).__mro__)
    known = isinstance(inner, PreTrainedModel) and named or isinstance(inner, _registered_causal_lms())
    return known and callable(getattr(model, "get_output_embeddings", None)) and \
        model.get_output_embeddings() is not None


def _recurrent_layers(cfg: Any) -> bool:
    """Layers that keep a recurrent or convolution state (transformers >= 5.25 marks them in ``layer_types``,
    ``"linear_attention"``, ``"conv"``, ``"hybrid"``, where older versions set ``model._is_stateful``)."""
    return any(isinstance(k, str) and (k in STATE_LAYER_TYPES or k.startswith("hybrid")) for k in layer_types(cfg))


def _check_model(model: Any, what: str) -> None:
    if not _is_causal_lm(model):
        raise SortedNetError(f"speculative_generate: the {what} must be a Hugging Face causal LM (e.g. "
                             f"LlamaForCausalLM, GPT2LMHeadModel) or a Nest of one; got {type(model).__name__}")
    if getattr(model, "_is_stateful", False) or _recurrent_layers(model.config):
        raise SortedNetError(f"speculative_generate: the {what} ({type(model).__name__}) keeps a recurrent state "
                             "(Mamba, RWKV, RecurrentGemma, hybrids) that rejected draft tokens cannot be rolled back "
                             "from; use model.generate")
    cfg = model.config
    rope = getattr(cfg, "rope_scaling", None) or getattr(cfg, "rope_parameters", None) or {}
    ropes = [rope, *(v for v in rope.values() if isinstance(v, dict))] if isinstance(rope, dict) else []
    kinds = {r.get("rope_type", r.get("type")) for r in ropes}  # (per layer type, as Gemma3's)
    kind = next((k for k in ("dynamic", "longrope") if k in kinds), None)
    if kind is not None:
        raise SortedNetError(f"speculative_generate: the {what} uses rope_type={kind!r}, whose frequencies depend on "
                             "the longest position in a forward: verifying several draft tokens at once would not "
                             "give generate()'s tokens; use model.generate")
    text = cfg.get_text_config(decoder=True) if hasattr(cfg, "get_text_config") else cfg
    shared = getattr(text, "num_kv_shared_layers", 0)
    if isinstance(shared, int) and shared > 0:
        raise SortedNetError(f"speculative_generate: the {what}'s last {shared} layers reuse the keys and values of "
                             "earlier layers (num_kv_shared_layers, as Gemma3n's), which the draft's cache, rolled "
                             "back per layer, does not model; use model.generate")


def _vocab(model: nn.Module) -> int:
    return model.get_output_embeddings().weight.shape[0]


def _depth(nest: Nest | None, model: nn.Module, sub: SubModel | None) -> int:
    n = model.config.num_hidden_layers
    if nest is None or sub is None:
        return n
    depth = [d for d in nest.dims if isinstance(d, Depth)]
    return sub[depth[0].name] if depth else n


def _hidden(model: nn.Module) -> int:
    cfg = model.config
    return getattr(cfg, "hidden_size", None) or getattr(cfg, "n_embd", 1)


def _resolve_exit(nest: Nest, sub: Any, base: SubModel | None) -> SubModel:
    """Resolve a sub-model of ``nest``; dimensions left out take ``base``'s sizes (the target's, same nest)."""
    if base is None:
        return nest.resolve(sub)
    if isinstance(sub, str):
        sub = SubModel.parse(sub)
    if not isinstance(sub, Mapping):
        raise SortedNetError(f"draft exits must be sub-models (a SubModel, dict or 'depth=2' string), got {sub!r}")
    return nest.resolve({**base, **sub})


def _params(nest: Nest | None, model: nn.Module, sub: SubModel | None) -> float:
    if nest is None:  # a plain model that another nest wraps runs that nest's sub-model in force: its cost
        from ..nest import _LIVE  # (Rank factors and adapters are not what it deploys)
        nest = next((n for n in list(_LIVE) if n.model is model), None)
        sub = nest.active if nest is not None else None
    return nest.cost(sub, "params") if nest is not None else sum(p.numel() for p in model.parameters())


def _is_depth(nest: Nest, name: str) -> bool:
    return any(d.name == name and isinstance(d, Depth) for d in nest.dims)


def _use(nest: Nest | None, sub: SubModel | None):
    if nest is None:
        return None
    return lambda: nest.use(sub)


def _thresholds(thresholds: Sequence[float] | None, m: int, labels: list[str]) -> list[float]:
    if thresholds is None:
        return [0.5] * (m - 1) + [0.0]
    if isinstance(thresholds, np.ndarray) and thresholds.ndim == 1:
        thresholds = thresholds.tolist()
    if isinstance(thresholds, (int, float, str, bytes)) or not isinstance(thresholds, Sequence):
        raise SortedNetError(f"thresholds must be a list with one value per exit {labels}, got {thresholds!r}")
    out = [float(t) if isinstance(t, (np.floating, np.integer)) else t for t in thresholds]
    if len(out) != m:
        raise SortedNetError(f"thresholds: {len(out)} value(s) {out} for {m} exit(s) {labels}; give one per exit")
    for t in out:
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0 <= t <= 1 or math.isnan(t):
            raise SortedNetError(f"thresholds must lie in [0, 1] (max softmax probability), got {out}")
    return [float(t) for t in out]


def make_plan(target: Any, draft: Any, *, exits: Sequence[Any] | None, thresholds: Sequence[float] | None,
              target_sub: Any, share_cache: bool | None) -> Plan:
    """Check everything and build the stacks (no forward runs)."""
    tnest = target if isinstance(target, Nest) else None
    tmodel = tnest.model if tnest else target
    _check_model(tmodel, "target")
    if tnest is None and target_sub is not None:
        raise SortedNetError("target_sub= needs a Nest target (sn.from_transformers(model, ...))")
    # default: the sub-model the target's forward runs for this caller (its `use` block, else the nest's
    # default: the largest unless activated), as model(...) and model.generate(...) would
    tsub = (tnest.resolve(target_sub) if target_sub is not None else tnest.active) if tnest else None
    L = _depth(tnest, tmodel, tsub)

    # the draft: a sub-model of the target's nest, the target's nest with exits, another nest, or a plain model
    if isinstance(draft, (str, Mapping)) or isinstance(draft, SubModel):
        if tnest is None:
            raise SortedNetError(f"draft={draft!r} names a sub-model, but the target is not a Nest; pass a separate "
                                 "draft model or nest, or nest the target with sn.from_transformers")
        if exits is not None:
            raise SortedNetError("give either draft=<sub-model> or exits=[...], not both")
        dnest, exits = tnest, [draft]
    elif isinstance(draft, Nest):
        dnest = draft
        # no exits: the draft nest's own sub-model in force (its `use` block, else its default), as the target's
        exits = [draft.active] if exits is None else exits
    elif isinstance(draft, nn.Module):
        if exits is not None:
            raise SortedNetError("exits= needs a Nest draft; a plain draft model has one exit (its last layer)")
        dnest = None
    else:
        raise SortedNetError(f"draft must be a sub-model of the target's nest ('depth=2'), a Nest or a causal LM, "
                             f"got {type(draft).__name__}")
    dmodel = dnest.model if dnest else draft
    same = dnest is not None and dnest is tnest
    overlap = any(m is tmodel for m in dmodel.modules()) or any(m is dmodel for m in tmodel.modules())
    if dnest is not None and not same and overlap:
        raise SortedNetError(f"the draft nest wraps the target model itself ({type(tmodel).__name__}): its draft "
                             "sub-model would be in force for the target's forwards too; pass the nest as the "
                             "target: speculative_generate(nest, ids, draft='depth=...') (or exits=[...] with "
                             "draft=nest)")
    if dnest is None and tnest is not None and overlap:
        raise SortedNetError(f"the draft is the target model itself ({type(tmodel).__name__}), which runs the "
                             "target's sub-model; pass a sub-model of the target's nest: speculative_generate(nest, "
                             "ids, draft='depth=...') (or exits=[...] with draft=nest)")
    if not same:  # (a plain draft beside a plain target too)
        _check_model(dmodel, "draft")
    if dnest is not None:
        if isinstance(exits, (str, Mapping, SubModel)) or not isinstance(exits, Sequence) or not exits:
            raise SortedNetError(f"exits must be a non-empty list of sub-models of the draft nest, got {exits!r}")
        subs = [_resolve_exit(dnest, e, tsub if same else None) for e in exits]
    else:
        subs = [None]
    labels = [str(s) if s is not None else type(dmodel).__name__ for s in subs]
    depths = [_depth(dnest, dmodel, s) for s in subs]
    if any(b <= a for a, b in zip(depths, depths[1:])):
        raise SortedNetError(f"exits must be strictly ascending in depth, got depths {depths} for {labels}")
    if dnest is not None:
        others = [{k: v for k, v in s.items() if not _is_depth(dnest, k)} for s in subs]
        if any(o != others[-1] for o in others):
            raise SortedNetError(f"exits {labels} differ in more than depth; a cascade runs one width "
                                 "configuration at several depths")
    th = _thresholds(thresholds, len(subs), labels)

    # sizes and vocabulary
    if _vocab(dmodel) != _vocab(tmodel):
        raise SortedNetError(f"draft vocabulary ({_vocab(dmodel)} tokens, {type(dmodel).__name__}) differs from the "
                             f"target's ({_vocab(tmodel)} tokens)")
    if same:
        big = [k for k in subs[-1] if subs[-1][k] > tsub[k]]
        if big:
            raise SortedNetError(f"draft {labels[-1]} is larger than the target {tsub} in {big}")
    elif _params(dnest, dmodel, subs[-1]) > _params(tnest, tmodel, tsub):
        raise SortedNetError(f"draft {labels[-1]} ({_params(dnest, dmodel, subs[-1]):.0f} parameters) is larger than "
                             f"the target ({_params(tnest, tmodel, tsub):.0f})")

    can_share = same and all({**s, **{k: tsub[k] for k in s if _is_depth(tnest, k)}} == tsub
                             for s in subs)
    unsupported = layer_runner_problem(tmodel) if can_share else None
    if share_cache and not can_share:
        why = ("the draft is not a sub-model of the target's nest" if not same else
               f"the draft {labels[-1]} differs from the target {tsub} in more than depth, so its keys/values differ")
        raise SortedNetError(f"share_cache=True: cannot share the KV cache: {why}")
    shared = can_share and unsupported is None if share_cache is None else bool(share_cache)
    needs_layers = [m for m, need in ((tmodel, shared), (dmodel, shared or len(subs) > 1)) if need]
    for m in needs_layers:
        problem = layer_runner_problem(m)
        if problem:
            what = "a shared cache" if shared else "a multi-exit cascade"
            raise SortedNetError(f"{what} needs the model run layer range by layer range: {problem}; "
                                 + ("pass share_cache=False" if shared else "use a single exit"))
    scale = 1.0 if same else (_hidden(dmodel) / _hidden(tmodel)) ** 2
    costs = [d / L * scale for d in depths]

    outer: list[AbstractContextManager] = []
    if shared:
        stack = Stack(LayerRunner(tmodel), sorted(set(depths) | {L}), None)
        outer.append(tnest.use(tsub))
        return Plan(stack, [(stack, stack.bounds.index(d)) for d in depths], labels, th, costs, True, outer,
                    [tmodel], _vocab(tmodel))
    # separate caches: each stack activates its own sub-model (per call when both live in one nest)
    tctx, dctx = _use(tnest, tsub), _use(dnest, subs[-1])
    if not same:
        outer += [c() for c in (tctx, dctx) if c is not None]
        tctx = dctx = None
    tstack = Stack(ForwardRunner(tmodel, L), [L], tctx)
    druns = LayerRunner(dmodel) if len(subs) > 1 else ForwardRunner(dmodel, depths[0])
    dstack = Stack(druns, depths, dctx)
    models = [tmodel] if same else [tmodel, dmodel]
    return Plan(tstack, [(dstack, i) for i in range(len(depths))], labels, th, costs, False, outer, models,
                _vocab(tmodel))

