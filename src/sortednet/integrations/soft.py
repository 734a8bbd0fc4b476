"""Sorted Fine-Tuning (SoFT): the loss of many depth exits in ONE forward pass.

Each exit ``e`` takes the output of block ``e`` (1-based), applies the model's
own final norm and shared LM head, exactly as the full model does after its
last block, and scores the causal LM loss. The losses are averaged (or
weighted), as in Sorted LLaMA (arXiv 2309.08968): depth nesting costs one
pass, not one per sub-model. Blocks after the deepest exit do not run.
"""

from __future__ import annotations

import functools
import inspect
import math
import numbers
import weakref
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..dims import Depth
from ..errors import SortedNetError
from ..modes import dry_run, finish_all
from ..nest import Nest
from .layouts import Found, detect
from .transformers import _layout_of

__all__ = ["soft_loss", "SoftOutput", "exit_parts", "causal_lm_loss"]


@dataclass
class SoftOutput:
    """``loss``: the (weighted) mean over exits; ``losses``: ``{exit depth: loss}``."""

    loss: Tensor
    losses: dict[int, Tensor]


class _Stop(Exception):
    """Raised by the deepest exit's hook: the remaining blocks need not run."""


def causal_lm_loss(logits: Tensor, labels: Tensor, num_items_in_batch: Any = None) -> Tensor:
    """Next-token cross-entropy (labels shifted by one, ``-100`` ignored), as HF causal LMs compute it: the mean
    over the counted tokens, or their sum over ``num_items_in_batch`` where it is given (the tokens of every
    micro-batch of an accumulated step, as the Trainer passes it).

    >>> import torch
    >>> causal_lm_loss(torch.zeros(1, 3, 5), torch.tensor([[1, 2, 3]])).item() == torch.log(torch.tensor(5.)).item()
    True
    """
    flat = (logits[:, :-1].reshape(-1, logits.shape[-1]).float(), labels[:, 1:].reshape(-1).to(logits.device,
                                                                                                  torch.long))
    if num_items_in_batch is None:
        return F.cross_entropy(*flat, ignore_index=-100)
    total = F.cross_entropy(*flat, ignore_index=-100, reduction="sum")
    if isinstance(num_items_in_batch, Tensor):
        num_items_in_batch = num_items_in_batch.to(total.device)
    return total / num_items_in_batch


def exit_parts(model: nn.Module, found: Found | None = None) -> tuple[nn.Module, nn.ModuleList, nn.Module, nn.Module]:
    """(base model, layer list, final norm, LM head) of a causal LM.

    >>> from transformers import GPT2Config, GPT2LMHeadModel
    >>> base, layers, norm, head = exit_parts(GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=4)))
    >>> type(norm).__name__, len(layers)
    ('LayerNorm', 2)
    """
    found = found or detect(model)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    norm_path = f"{found.parent}.{found.layout.norm}" if found.parent else found.layout.norm
    if not found.layout.causal:
        raise SortedNetError(f"SoFT trains the exits of a causal (decoder-only) LM, by the next-token loss; "
                             f"{type(model).__name__} ({found.layout.family} layout) is none (an encoder, or an "
                             "encoder-decoder)")
    if head is None or not found.layout.norm:
        raise SortedNetError(f"SoFT needs a causal LM with a final norm and an LM head; {type(model).__name__} "
                             f"({found.layout.family} layout) has " + ("no LM head" if head is None else
                                                                      "no final norm"))
    cfg = getattr(model, "config", None)
    post = [k for k in ("final_logit_softcapping", "logit_scale", "logits_scaling", "lm_head_multiplier",
                        "output_multiplier_scale") if getattr(cfg, k, None) not in (None, 1, 1.0)]
    if post:
        raise SortedNetError(f"SoFT reads exits as final norm -> LM head; {type(model).__name__} also transforms "
                             f"its logits ({post[0]}={getattr(cfg, post[0])}), which soft_loss does not reproduce")
    if getattr(cfg, "output_router_logits", False):
        raise SortedNetError(f"SoFT: {type(model).__name__} adds a router load-balancing loss (output_router_logits="
                             "True), which soft_loss does not add at the exits; set config.output_router_logits=False "
                             "(and add the auxiliary loss yourself) or train without SoFT")
    base = model.get_submodule(found.parent.split(".")[0]) if found.parent else model
    try:
        norm = model.get_submodule(norm_path)
    except AttributeError:
        norm = None
    if not isinstance(norm, nn.Module):
        raise SortedNetError(f"SoFT reads exits as final norm -> LM head; {type(model).__name__} has no final norm "
                             f"at {norm_path!r} in this config (e.g. OPT with do_layer_norm_before=False)")
    extra = [n for n in ("project_out",) if isinstance(getattr(base, n, None), nn.Module)
             or isinstance(getattr(getattr(base, "decoder", None), n, None), nn.Module)]
    if extra:
        raise SortedNetError(f"SoFT reads exits as final norm -> LM head; {type(model).__name__} also projects its "
                             f"hidden states ({extra[0]}, word_embed_proj_dim != hidden_size), which soft_loss does "
                             "not reproduce")
    return base, model.get_submodule(found.layers), norm, head


def soft_loss(model: nn.Module | Nest, input_ids: Tensor | None = None, *, exits: Sequence[int] | None = None,
              weights: Sequence[float] | None = None, labels: Tensor | None = None,
              attention_mask: Tensor | None = None, **model_inputs: Any) -> SoftOutput:
    """Causal LM loss at every exit depth in ``exits``, from one forward pass.

    ``exits`` defaults to the sizes of the nest's ``Depth`` dimension (up to the active depth), else
    every block. The rest of the model (width / heads) runs as the active
    sub-model, so combine with ``nest.use(...)`` and a sampler for those.
    Other inputs of the model (``position_ids`` of packed sequences,
    ``token_type_ids``, ``inputs_embeds`` instead of ``input_ids``, which
    then needs ``labels``) go to its forward as they would without SoFT; one
    its base model does not take is refused. ``labels`` default to
    ``input_ids`` as they are, like ``model(input_ids, labels=input_ids)``:
    ``attention_mask`` does not take padding out of the loss; pass labels with
    ``-100`` at the padded positions (``DataCollatorForLanguageModeling`` does).
    ``num_items_in_batch`` (the Trainer's count of the tokens of a whole
    accumulated step) divides each exit's summed loss by it, as the model's
    own loss does, instead of taking its mean.

    >>> import torch, sortednet as sn
    >>> from transformers import GPT2Config, GPT2LMHeadModel
    >>> model = GPT2LMHeadModel(GPT2Config(n_layer=4, n_embd=32, n_head=4, vocab_size=50))
    >>> out = soft_loss(model, torch.randint(0, 50, (2, 8)), exits=[2, 4])
    >>> sorted(out.losses), out.loss.shape
    ([2, 4], torch.Size([]))
    """
    nest = model if isinstance(model, Nest) else None
    model = nest.model if nest is not None else model
    found = _layout_of(nest) if nest is not None else detect(model)
    base, layers, norm, head = exit_parts(model, found)
    n = len(layers)
    cut: list[int] = []  # (default exits past the active depth: left out)
    if exits is None:
        depth = [d for d in (nest.dims if nest else ()) if isinstance(d, Depth)]
        exits = [s for s in depth[0].sizes if s <= n] if depth else list(range(1, n + 1))
        cut = [s for s in depth[0].sizes if s > n] if depth else []
    if isinstance(exits, Mapping):  # (its values are not weights: they were dropped in silence)
        raise SortedNetError(f"soft_loss: exits is a mapping ({exits!r}); give the depths as a list and their weights "
                             "apart: soft_loss(..., exits=list(d), weights=list(d.values()))")
    if weights is not None and isinstance(exits, (set, frozenset)):  # (no order: weights paired with what?)
        raise SortedNetError(f"soft_loss: exits given as a {type(exits).__name__} have no order to pair the weights "
                             f"with; give them as a list, in the weights' order (got exits={exits!r})")
    given = _listed(exits.tolist() if isinstance(exits, Tensor) else exits, "exits", "exit depths, e.g. [2, 4]")
    bad = [e for e in given if isinstance(e, bool) or not isinstance(e, numbers.Integral) or not 1 <= e <= n]
    if not given or bad:
        raise SortedNetError(f"soft_loss: exits must be block counts (ints) in 1..{n} (active depth), got {given}")
    given = [int(e) for e in given]  # (numpy ints)
    if len(set(given)) != len(given):
        raise SortedNetError(f"soft_loss: exits must be distinct, got {given}")
    if weights is None:
        exits, weights = sorted(given), [1.0] * len(given)
    else:
        weights = _listed(weights, "weights", "one weight per exit, e.g. [1.0, 2.0]")
        if not all(isinstance(w, numbers.Real) and not isinstance(w, bool) and math.isfinite(w) for w in weights):
            raise SortedNetError(f"soft_loss: weights must be finite numbers, got {weights}")
        weights = [float(w) for w in weights]
        if len(weights) != len(given) or len(set(given)) != len(given) or sum(weights) <= 0 or min(weights) < 0:
            raise SortedNetError(f"soft_loss: need distinct exits and one non-negative weight per exit, got exits "
                                 f"{given} and weights {weights}" + (
                                     f" (the default exits, the Depth's sizes, stop at the active depth {n}: "
                                     f"{cut} are past it under this sub-model; run soft_loss under sub-models at "
                                     "full depth, e.g. a sampler over them, or pass exits= with weights= for this "
                                     "depth)" if cut and len(weights) != len(given) else ""))
        pairs = sorted(zip(given, weights))  # each weight stays with its exit
        exits, weights = [e for e, _ in pairs], [w for _, w in pairs]
    items = model_inputs.pop("num_items_in_batch", None)  # (the loss's, not the base model's: it takes any
    if items is not None and not (                       # keyword and drops it, and the mean was returned)
            isinstance(items, numbers.Integral) and not isinstance(items, bool) and items > 0
            or isinstance(items, Tensor) and items.numel() == 1 and not items.is_floating_point()
            and bool(items.reshape(()) > 0)):
        raise SortedNetError(f"soft_loss: num_items_in_batch is the count of tokens the loss's sum is divided by, a "
                             f"positive int (or an integer tensor of one value), got {items!r}")
    taken = ("past_key_values", "cache", "output_hidden_states", "return_dict")
    if any(k in model_inputs for k in taken):
        raise SortedNetError(f"soft_loss runs one forward from the start and reads the exits itself: "
                             f"{sorted(k for k in model_inputs if k in taken)} cannot be passed")
    params = inspect.signature(base.forward).parameters
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        unknown = sorted(k for k in model_inputs if k not in params)
        if unknown:
            raise SortedNetError(f"soft_loss: {type(base).__name__}.forward takes no {unknown} (the inputs of the "
                                 f"exits' base model are {[k for k in params if k != 'self']})")
    if labels is None and input_ids is None:
        raise SortedNetError("soft_loss without input_ids (inputs_embeds=...) needs labels=")
    given = "labels" if labels is not None else "input_ids (the labels when none are given)"
    labels = input_ids if labels is None else labels
    if not isinstance(labels, Tensor) or labels.is_floating_point() or labels.dim() != 2:
        raise SortedNetError(f"soft_loss: {given} must be token ids of shape (batch, length), got "
                             f"{type(labels).__name__}" + (f" {labels.dtype} {tuple(labels.shape)}"
                                                           if isinstance(labels, Tensor) else ""))
    if labels.shape[1] < 2:
        raise SortedNetError(f"soft_loss: the labels hold {labels.shape[1]} position(s); the next-token loss needs "
                             "at least 2 (its mean over no pair would be NaN)")
    seq = input_ids if input_ids is not None else model_inputs.get("inputs_embeds")
    if isinstance(seq, Tensor) and tuple(labels.shape) != tuple(seq.shape[:2]):
        raise SortedNetError(f"soft_loss: labels of shape {tuple(labels.shape)} for inputs of (batch, length) "
                             f"{tuple(seq.shape[:2])}: they must align position by position (unshifted: the loss "
                             "shifts them by one, as transformers' causal LMs do)")
    _verify_reading(model, layers, norm, head, dict(input_ids=input_ids, attention_mask=attention_mask,
                                                    **model_inputs))
    captured: dict[int, Tensor] = {}

    def hook_for(e: int):
        def hook(module: nn.Module, args: tuple, out) -> None:
            captured[e] = out[0] if isinstance(out, (tuple, list)) else out
            if e == exits[-1]:
                raise _Stop

        hook._sn_call = captured  # (this call's hooks are found by it: see the finally below)
        return hook

    blocks = list(layers)
    try:
        for e in exits:
            blocks[e - 1].register_forward_hook(hook_for(e))
        base(input_ids=input_ids, attention_mask=attention_mask, **model_inputs)  # (as the model's own call:
        # use_cache changes more than memory in some models, e.g. whether packed position_ids mask per sequence)
    except _Stop:
        pass
    finally:  # every hook of this call goes, also one registered as a Ctrl-C came (before a handle was kept)
        _unhook(blocks, captured)
    losses = {e: causal_lm_loss(head(norm(captured[e])), labels, items) for e in exits}
    total = sum(w * losses[e] for w, e in zip(weights, exits)) / sum(weights)
    return SoftOutput(total, losses)


#: model -> the config values under which its logits were found to be final norm -> LM head of the last block
_VERIFIED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _config_key(model: nn.Module) -> tuple:
    cfg = getattr(model, "config", None)
    items = vars(cfg).items() if cfg is not None and hasattr(cfg, "__dict__") else ()
    return tuple(sorted((k, v) for k, v in items if isinstance(v, (bool, int, float, str, type(None)))))


def _first_tensor(args: tuple, kwargs: dict) -> Tensor | None:
    return next((t for t in (*args, *kwargs.values()) if isinstance(t, Tensor)), None)


def _logits_of(out: Any) -> Any:
    if isinstance(out, Mapping):
        return out.get("logits")
    logits = getattr(out, "logits", None)
    if logits is None and isinstance(out, (tuple, list)) and out:
        logits = out[0]
    return logits


def _same(a: Tensor, b: Tensor) -> bool:
    """The same values (NaN equal to NaN): tensors of one forward, compared without a tolerance."""
    if a is b:
        return True
    if a.shape != b.shape:
        return False
    a = a.to(b.dtype)
    eq = a == b
    return bool(eq.all()) or bool(eq.logical_or_(a.isnan() & b.isnan()).all())


def _verify_reading(model: nn.Module, layers: nn.ModuleList, norm: nn.Module, head: nn.Module,
                    inputs: dict[str, Any]) -> None:
    """Once per model (and again when a config value changes): the model's own logits must be its LM head's
    output, the head's input its final norm's output, and the norm's input the last block's output, which is
    how every exit is read. A model that does more there (a scale, a cut of the vocabulary, a projection that
    no list of config names foresees) is refused, where soft_loss would silently train on another objective
    than the model's loss. One forward of the model without gradients that changes nothing (``dry_run``, the
    random streams forked): the tensors compared come from that one forward, so its precision (autocast,
    mixed precision wrappers) is the same on both sides and they are compared exactly."""
    key = _config_key(model)
    if _VERIFIED.get(model) == key:
        return
    seen: dict[str, Any] = {}

    versions: dict[str, tuple[Tensor, int]] = {}  # (a tensor written in place after its module returned: a mask)

    def at_block(module: nn.Module, args: tuple, out: Any) -> None:
        seen["h"] = out[0] if isinstance(out, (tuple, list)) else out
        if isinstance(seen["h"], Tensor) and not seen["h"].is_inference():  # (inference tensors keep no version)
            versions["its last block's output"] = (seen["h"], seen["h"]._version)

    def at(name: str):
        def hook(module: nn.Module, args: tuple, kwargs: dict, out: Any) -> None:
            seen[name] = (_first_tensor(args, kwargs), out)
            if isinstance(out, Tensor) and not out.is_inference():
                versions[f"its {'final norm' if name == 'norm' else 'LM head'}'s output"] = (out, out._version)

        hook._sn_call = seen
        return hook

    at_block._sn_call = seen  # (found by it and removed, also after a Ctrl-C before a handle was kept)
    blocks = list(layers)
    cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
    try:
        for b in blocks:
            b.register_forward_hook(at_block)
        norm.register_forward_hook(at("norm"), with_kwargs=True)
        head.register_forward_hook(at("head"), with_kwargs=True)
        with dry_run(model), torch.no_grad(), \
                torch.random.fork_rng(devices=list(range(torch.cuda.device_count())) if cuda else []):
            try:
                out = model(**inputs)
            except Exception as e:
                raise SortedNetError(f"soft_loss checks once that {type(model).__name__}'s logits are its final norm "
                                     "-> LM head of the last block, by one forward of the model without gradients; "
                                     f"that forward raised {type(e).__name__}: {e}") from e
        logits = _logits_of(out)
    finally:
        finish_all([functools.partial(_unhook, [*blocks, norm, head], seen)])
    who = type(model).__name__
    if not isinstance(logits, Tensor) or "h" not in seen or "norm" not in seen or "head" not in seen:
        raise SortedNetError(f"SoFT: {who}'s forward did not return logits or did not run its final norm and LM "
                             "head as soft_loss reads them (final norm -> LM head of the last block), so the "
                             "exits' losses cannot be checked against the model's loss")
    written = [what for what, (t, v) in versions.items() if t._version != v]
    if written:
        raise SortedNetError(f"SoFT reads exits as final norm -> LM head; {who}'s forward writes {written[0]} in "
                             "place after it is made (e.g. a mask over part of the vocabulary), which soft_loss "
                             "does not reproduce: its losses would not be the model's loss")
    (norm_in, norm_out), (head_in, head_out) = seen["norm"], seen["head"]
    if not isinstance(head_out, Tensor) or logits.shape != head_out.shape:
        raise SortedNetError(f"SoFT reads exits as final norm -> LM head; {who}'s own logits have shape "
                             f"{tuple(logits.shape)}, its LM head's output "
                             f"{tuple(getattr(head_out, 'shape', ()))} (the model cuts or pads its vocabulary "
                             "after the head), which soft_loss does not reproduce")
    for a, b, where in ((seen["h"], norm_in, "its last block and its final norm"),
                        (norm_out, head_in, "its final norm and its LM head"),
                        (head_out, logits, "its LM head and its logits")):
        if not (isinstance(a, Tensor) and isinstance(b, Tensor) and _same(a, b)):
            raise SortedNetError(f"SoFT reads exits as final norm -> LM head; {who}'s forward does more between "
                                 f"{where} (e.g. a scale or multiplier), which soft_loss does not reproduce: its "
                                 "losses would not be the model's loss")
    _VERIFIED[model] = key


def _listed(values: Any, what: str, want: str, who: str = "soft_loss") -> list:
    """``values`` as a list, or a SortedNetError naming ``what`` when it is not a sequence (a lone number)."""
    if isinstance(values, (str, bytes)) or not isinstance(values, Iterable):
        raise SortedNetError(f"{who}: {what} must be a list of {want}, got {values!r}")
    if isinstance(values, Mapping):  # (iterated, a dict gives its keys: {4: 3.0, 2: 1.0} would weigh by the depths)
        raise SortedNetError(f"{who}: {what} is a mapping ({values!r}), which gives its keys as a list; give "
                             f"{what} as a list of {want}, in the exits' order")
    if isinstance(values, (set, frozenset)) and "weights" in what:  # (no order to pair with the exits)
        raise SortedNetError(f"{who}: {what} given as a {type(values).__name__} have no order to pair them with the "
                             f"exits; give a list of {want}, in the exits' order (got {values!r})")
    if isinstance(values, (Tensor, np.ndarray)):
        values = values.tolist()
        if not isinstance(values, list):  # (a 0-d tensor or array: one number)
            raise SortedNetError(f"{who}: {what} must be a list of {want}, got {values!r}")
    return list(values)


def _unhook(blocks: list[nn.Module], call: dict) -> None:
    """Remove the exit hooks of one soft_loss call from every block, each even after a Ctrl-C part-way."""
    finish_all([functools.partial(_unhook_block, b, call) for b in blocks])


def _unhook_block(block: nn.Module, call: dict) -> None:
    for k in [k for k, fn in block._forward_hooks.items() if getattr(fn, "_sn_call", None) is call]:
        block._forward_hooks.pop(k, None)
        block._forward_hooks_with_kwargs.pop(k, None)
        block._forward_hooks_always_called.pop(k, None)
