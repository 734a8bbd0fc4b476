"""A causal LM run in depth segments, each with its own slice of one KV cache.

A :class:`Stack` cuts a model's layers at boundaries ``b_1 < ... < b_m``
(``b_m``: the last layer it runs). Segment ``j`` (layers ``b_{j-1} .. b_j - 1``)
has processed positions ``0 .. c_j - 1``; ``c_1 >= c_2 >= ... >= c_m``. The
hidden states at boundary ``b_j`` of the positions segment ``j + 1`` has not
seen yet (``c_{j+1} .. c_j - 1``) wait in ``pending[j]``: a token that exits
early leaves the deeper segments behind, and the next token that goes deeper
pushes those stored states through them first (one chunk). ``rollback(v)``
drops every cache entry and pending state of positions ``>= v``.

Runners compute segments: :class:`LayerRunner` calls the model's own blocks
(Llama-family, GPT-2) so that verification can start from a draft's
layer-``d`` hidden states; :class:`ForwardRunner` calls the whole model's
``forward`` (any Hugging Face causal LM, one segment only).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager

import torch
from torch import Tensor, nn

from ..errors import SortedNetError

__all__ = ["Stack", "LayerRunner", "ForwardRunner", "LAYER_FAMILIES", "layer_runner_problem"]

# model_type -> (layer list, final norm, embedding) paths relative to the base model
LAYER_FAMILIES = {"llama": ("layers", "norm", "embed_tokens"), "gpt2": ("h", "ln_f", "wte")}


def _new_cache(model: nn.Module):
    from transformers import DynamicCache

    # one full (growing) layer cache per layer, never the sliding-window kind that DynamicCache(config=...)
    # builds for Mistral / Qwen2 / Gemma-2: drafts are rolled back (cropped), which a sliding layer that already
    # dropped past states cannot do; the model's attention mask still applies the window
    return DynamicCache()


def layer_runner_problem(model: nn.Module) -> str | None:
    """Why ``model`` cannot be run layer range by layer range (``None``: it can)."""
    cfg = getattr(model, "config", None)
    kind = getattr(cfg, "model_type", None)
    if kind not in LAYER_FAMILIES:
        return (f"{type(model).__name__} (model_type {kind!r}) is not one of the families whose blocks "
                f"sortednet runs range by range ({sorted(LAYER_FAMILIES)})")
    if any(t != "full_attention" for t in (getattr(cfg, "layer_types", None) or ())):
        return f"{type(model).__name__} has non-full attention layers ({set(cfg.layer_types)})"
    if getattr(cfg, "add_cross_attention", False):
        return f"{type(model).__name__} has cross-attention"
    return _api(model)[0]


def _api(model: nn.Module) -> tuple[str | None, dict[str, str]]:
    """(why not, names): the argument names this transformers version's blocks and ``create_causal_mask`` take
    for what :class:`LayerRunner` passes (they were renamed across 5.x: ``past_key_values`` -> ``cache``,
    ``input_embeds`` -> ``inputs_embeds``). A version whose functions take other arguments is refused: a cache
    passed under a name the block does not know would vanish into its ``**kwargs``, unfilled."""
    import transformers
    from transformers import masking_utils

    base = getattr(model, model.base_model_prefix)
    layers = getattr(base, LAYER_FAMILIES[model.config.model_type][0])
    block = _named_params(type(layers[0]))
    mask = inspect.signature(masking_utils.create_causal_mask).parameters
    names = {"block_cache": next((n for n in ("cache", "past_key_values") if n in block), ""),
             "mask_cache": next((n for n in ("cache", "past_key_values") if n in mask), ""),
             "mask_embeds": next((n for n in ("inputs_embeds", "input_embeds") if n in mask), "")}
    need = ["attention_mask", "use_cache"] + (["position_embeddings", "position_ids"]
                                              if model.config.model_type != "gpt2" else [])
    missing = [f"{type(layers[0]).__name__}.forward({n}=)" for n in need if n not in block]
    missing += [f"create_causal_mask({n}=)" for n in ("config", "attention_mask", "position_ids", "layer_idx")
                if n not in mask]
    missing += [what for what, n in (("a block's cache argument", names["block_cache"]),
                                     ("create_causal_mask's cache argument", names["mask_cache"]),
                                     ("create_causal_mask's embeddings argument", names["mask_embeds"])) if not n]
    if missing:
        return (f"{type(layers[0]).__name__} (transformers {transformers.__version__}) lacks what sortednet runs a "
                f"block range with ({', '.join(missing)})"), names
    return None, names


def _named_params(cls: type) -> Mapping[str, inspect.Parameter]:
    """The parameters ``cls.forward`` takes by name: a subclass whose forward passes ``(*args, **kwargs)``
    through reads as the first class up its MRO that names them."""
    for k in cls.__mro__:
        f = k.__dict__.get("forward")
        if f is None:
            continue
        params = inspect.signature(f).parameters
        kinds = {p.kind for n, p in params.items() if n != "self"}
        if kinds - {inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD} or \
                inspect.Parameter.VAR_KEYWORD not in kinds:
            return params
    return {}


class LayerRunner:
    """Runs blocks ``lo .. hi - 1`` of a Llama-family or GPT-2 causal LM on a chunk of positions."""

    def __init__(self, model: nn.Module) -> None:
        problem = layer_runner_problem(model)
        if problem:
            raise SortedNetError(problem)
        self.model = model
        self.kind = model.config.model_type
        base = getattr(model, model.base_model_prefix)
        layers, norm, embed = LAYER_FAMILIES[self.kind]
        self.base, self.layers = base, getattr(base, layers)
        self.norm, self.embed, self.head = getattr(base, norm), getattr(base, embed), model.get_output_embeddings()
        self.n_layers = len(self.layers._modules)
        self.names = _api(model)[1]

    def new_cache(self):
        return _new_cache(self.model)

    def run(self, x: Tensor, lo: int, hi: int, cache, pos: Tensor) -> Tensor:
        """Hidden states after block ``hi - 1``; ``x`` holds token ids when ``lo == 0``."""
        from transformers.masking_utils import create_causal_mask

        cfg, layers, names = self.base.config, self.layers, self.names
        if lo == 0:
            x = self.embed(x)
            if self.kind == "gpt2":
                x = self.base.drop(x + self.base.wpe(pos))
        mask = create_causal_mask(config=cfg, attention_mask=None, position_ids=pos, layer_idx=lo,
                                  **{names["mask_embeds"]: x, names["mask_cache"]: cache})
        kw = {names["block_cache"]: cache, "attention_mask": mask, "use_cache": True}
        if self.kind == "gpt2":
            for i in range(lo, hi):
                x = layers[i](x, position_ids=pos, **kw)
        else:
            pe = self.base.rotary_emb(x, position_ids=pos)
            for i in range(lo, hi):
                x = layers[i](x, position_embeddings=pe, position_ids=pos, **kw)
        return x

    def logits(self, h: Tensor) -> Tensor:
        return self.head(self.norm(h))


#: errors of the machine, not of the model or its cache: passed on as they are (a caller's retry with a smaller
#: batch catches them by type)
RESOURCE_ERRORS: tuple[type[BaseException], ...] = (getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError),
                                                    MemoryError)


class ForwardRunner:
    """The model's own ``forward`` as one segment (any Hugging Face causal LM); "hidden states" are logits."""

    def __init__(self, model: nn.Module, n_layers: int) -> None:
        self.model, self.n_layers = model, n_layers
        params = inspect.signature(model.forward).parameters
        self.cache_kw = "cache" if "cache" in params else "past_key_values"
        self.pos_kw = "position_ids" in params
        # a forward with the cache holding positions went through: the family runs with the cache driven so, and a
        # later error is the forward's own (a hook's, a device's), passed on as it is
        self.ran = False

    def new_cache(self):
        return _new_cache(self.model)

    def run(self, x: Tensor, lo: int, hi: int, cache, pos: Tensor) -> Tensor:
        kw = {self.cache_kw: cache, "use_cache": True}
        if self.pos_kw:
            kw["position_ids"] = pos
        filled = bool(cache.get_seq_length()) if hasattr(cache, "get_seq_length") else False
        try:
            out = self.model(input_ids=x, **kw).logits
        except (SortedNetError, *RESOURCE_ERRORS):  # (out of memory: the device's, whatever the cache)
            raise
        except Exception as e:  # (a family that builds its cache its own way: e.g. Dory's per-loop layers)
            if self.ran:  # (the cache served before: a hook's error, a device's, passed on as it is)
                raise
            raise SortedNetError(
                f"speculative_generate: {type(self.model).__name__}'s forward raised {type(e).__name__} "
                f"({str(e)[:200]}) with the key/value cache speculative decoding drives (a transformers "
                "DynamicCache grown layer by layer and cropped back after each rejected draft token): unless the "
                "error is the forward's own (a hook's, the device's, the data's: chained below; it passes through "
                "as it is once a forward with a filled cache went through), this family's cache is not one it can "
                "drive: decode with model.generate instead") from e
        self.ran = self.ran or filled
        return out

    def logits(self, h: Tensor) -> Tensor:
        return h


class Stack:
    """One model's segments, cache and pending hidden states (see the module docstring).

    ``bounds``: ascending block counts, the last one the deepest this stack runs;
    ``context``: a callable returning the context manager that makes the right
    sub-model active (width / heads) while this stack computes.
    """

    def __init__(self, runner: LayerRunner | ForwardRunner, bounds: Sequence[int],
                 context: Callable[[], AbstractContextManager] | None) -> None:
        self.runner, self.bounds, self.context = runner, tuple(bounds), context
        self.cache = runner.new_cache()
        self.c = [0] * len(self.bounds)
        self.pending: list[Tensor | None] = [None] * len(self.bounds)
        self.layer_tokens = 0   # sum over segment runs of (blocks x positions): the work done
        self.out: list[Tensor] = []   # hidden states at the deepest boundary, in position order

    def hidden(self, j: int, ids: Tensor, upto: int) -> Tensor | None:
        """:meth:`run_to` with this stack's sub-model active."""
        if self.context is None:
            return self.run_to(j, ids, upto)
        with self.context():
            return self.run_to(j, ids, upto)

    def logits(self, h: Tensor) -> Tensor:
        if self.context is None:
            return self.runner.logits(h)
        with self.context():
            return self.runner.logits(h)

    def run_to(self, j: int, ids: Tensor, upto: int) -> Tensor | None:
        """Make segment ``j`` see positions ``< upto``; returns the new hidden states at ``bounds[j]``
        (positions ``c_j(old) .. upto - 1``), or ``None`` when it had seen them already."""
        start = self.c[j]
        if start >= upto:
            return None
        lo = self.bounds[j - 1] if j else 0
        if j == 0:
            x = ids[:, start:upto]
        else:
            self.run_to(j - 1, ids, upto)
            below = self.pending[j - 1]          # positions c_j .. c_{j-1} - 1
            x, rest = below[:, : upto - start], below[:, upto - start:]
            self.pending[j - 1] = rest if rest.shape[1] else None
        pos = torch.arange(start, upto, device=ids.device).unsqueeze(0)
        h = self.runner.run(x, lo, self.bounds[j], self.cache, pos)
        self.layer_tokens += (self.bounds[j] - lo) * (upto - start)
        self.c[j] = upto
        if j == len(self.bounds) - 1:
            self.out.append(h)
        else:
            prev = self.pending[j]
            self.pending[j] = h if prev is None else torch.cat([prev, h], dim=1)
        return h

    def rollback(self, v: int) -> None:
        """Forget every position ``>= v`` (cache entries and pending states)."""
        for j, c in enumerate(self.c):
            nxt = self.c[j + 1] if j + 1 < len(self.c) else None
            if nxt is not None and self.pending[j] is not None:
                keep = max(0, v - nxt)
                self.pending[j] = self.pending[j][:, :keep] if keep else None
            if c > v:
                lo = self.bounds[j - 1] if j else 0
                for i in range(lo, self.bounds[j]):
                    if i < len(self.cache.layers):
                        layer = self.cache.layers[i]
                        n = layer.get_seq_length()
                        if n > v:
                            layer.crop(v - n)
                self.c[j] = v

    def layer_lengths(self) -> list[int]:
        """Cached positions of every block this stack runs (for checks)."""
        out = []
        for i in range(self.bounds[-1]):
            out.append(self.cache.layers[i].get_seq_length() if i < len(self.cache.layers) else 0)
        return out

    def check(self) -> None:
        """Internal consistency: each block holds its segment's positions; pending states fill the gaps."""
        lengths = self.layer_lengths()
        for j, c in enumerate(self.c):
            lo = self.bounds[j - 1] if j else 0
            bad = [i for i in range(lo, self.bounds[j]) if lengths[i] != c]
            if bad:
                raise AssertionError(f"blocks {bad} hold {[lengths[i] for i in bad]} positions, segment {j} has {c}")
            if j + 1 < len(self.c):
                n = 0 if self.pending[j] is None else self.pending[j].shape[1]
                if self.c[j + 1] + n != c:
                    raise AssertionError(f"segment {j}: {self.c[j + 1]} + {n} pending != {c}")
