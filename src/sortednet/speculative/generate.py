"""``speculative_generate``: draft with nested sub-models, verify with the target, keep its output."""

from __future__ import annotations

import difflib
import inspect
import math
import threading
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ..errors import SortedNetError, flag
from ..modes import restore_modes
from .plan import Plan, make_plan
from .sampling import Sampling, accept_greedy, accept_sampled, auto_draft_length
from .stack import RESOURCE_ERRORS

__all__ = ["speculative_generate", "SpeculativeOutput", "SpeculativeStats", "ExitStats"]

_accept = accept_sampled      # the sampling acceptance rule (tests swap in a wrong one to see it detected)
_on_round = None              # test hook: called with a _Round after every verify step


@dataclass
class ExitStats:
    """Draft tokens that left the draft at one exit, and how many of them the target kept."""

    drafted: int = 0
    accepted: int = 0


@dataclass
class SpeculativeStats:
    """Counts of one ``speculative_generate`` call.

    ``target_forwards`` counts verify passes (the first one also reads the
    prompt); ``mean_accepted`` is tokens gained per verify pass, the target's
    own (bonus or correction) token included, so it is at least 1.
    """

    new_tokens: int = 0
    target_forwards: int = 0
    drafted: int = 0
    accepted: int = 0
    exits: dict[str, ExitStats] = field(default_factory=dict)
    draft_lengths: list[int] = field(default_factory=list)

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def mean_accepted(self) -> float:
        return self.new_tokens / self.target_forwards if self.target_forwards else 0.0


@dataclass
class SpeculativeOutput:
    """``sequences``: prompt + new tokens (like ``generate``); ``stats``: :class:`SpeculativeStats`."""

    sequences: Tensor
    stats: SpeculativeStats


@dataclass
class _Round:
    """What a test hook sees after a verify step."""

    plan: Plan
    ids: Tensor            # (1, length before + drafted): the tokens the target verified
    first: int             # position whose next-token logits are target_logits[0]
    target_logits: Tensor  # (drafted + 1, vocab)
    length: int            # sequence length after the round (its last token is in no cache yet)


#: generation_config settings that transform the logits inside generate(), with their neutral values
_UNSUPPORTED: dict[str, tuple] = {
    "repetition_penalty": (None, 1.0), "encoder_repetition_penalty": (None, 1.0), "no_repeat_ngram_size": (None, 0),
    "encoder_no_repeat_ngram_size": (None, 0), "bad_words_ids": (None,), "suppress_tokens": (None, ()),
    "begin_suppress_tokens": (None, ()), "forced_bos_token_id": (None,), "forced_eos_token_id": (None,),
    "min_length": (None, 0), "min_new_tokens": (None, 0), "sequence_bias": (None,),
    "exponential_decay_length_penalty": (None,), "forced_decoder_ids": (None,),
    "guidance_scale": (None, 1.0), "watermarking_config": (None,), "num_beams": (None, 1),
    "num_return_sequences": (None, 1), "penalty_alpha": (None,), "diversity_penalty": (None, 0.0),
    "stop_strings": (None,), "dola_layers": (None,), "force_words_ids": (None,), "constraints": (None,),
}
#: settings that hold back the eos token: nothing to do without one (generate() adds no processor then)
_EOS_ONLY = frozenset({"min_length", "min_new_tokens"})


def _neutral(v: Any, default: tuple) -> bool:
    """Whether a generation setting leaves generate()'s logits alone: its neutral value (an empty list of tokens to
    suppress suppresses none; generate() refuses an empty list of bad words or biases itself)."""
    return v in default or isinstance(v, (list, tuple)) and not v and () in default


#: sampling filters that generate() applies with do_sample=True only (greedy decoding ignores them)
_UNSUPPORTED_SAMPLING: dict[str, tuple] = {
    "min_p": (None,), "top_h": (None,), "typical_p": (None, 1.0), "epsilon_cutoff": (None, 0.0),
    "eta_cutoff": (None, 0.0),
}


#: what generate() samples with where neither the call nor the model's generation config sets a value
_SAMPLING_DEFAULTS = {"temperature": 1.0, "top_k": 50, "top_p": 1.0}


def _sampling(gen: Any, do_sample: Any, temperature: Any, top_k: Any, top_p: Any, generator: Any) -> Sampling:
    """The sampling ``generate`` would do: each value left out comes from the generation config, else from
    generate's defaults (top-k 50 included); ``top_k=0`` and ``top_p=1`` filter nothing."""
    if do_sample is None:
        do_sample = getattr(gen, "do_sample", None) or False
    if not isinstance(do_sample, (bool, np.bool_)):
        raise SortedNetError(f"do_sample must be True or False, got {do_sample!r}")
    given = {"temperature": temperature, "top_k": top_k, "top_p": top_p}
    if do_sample:  # (greedy decoding reads no sampling value: the config's are not looked at, as in generate)
        given = {k: x if x is not None else getattr(gen, k, None) for k, x in given.items()}
    v = {k: x if x is not None else _SAMPLING_DEFAULTS[k] for k, x in given.items()}
    k = v["top_k"]
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 0:
        raise SortedNetError(f"top_k must be an int >= 0 (0: no top-k filter) or None, got {k!r}")
    p = v["top_p"]
    if isinstance(p, (int, float, np.floating)) and not isinstance(p, bool) and p == 1:
        p = None  # (generate adds no top-p filter at 1)
    return Sampling(bool(do_sample), _py_float(v["temperature"]), int(k) or None, _py_float(p), generator)


def _py_int(v: Any) -> Any:
    """A numpy integer as a Python int (validated as one); anything else as given."""
    return int(v) if isinstance(v, np.integer) else v


def _py_float(v: Any) -> Any:
    """A numpy number as a Python float (validated as one); anything else as given."""
    return float(v) if isinstance(v, (np.floating, np.integer)) else v


def _validate(input_ids: Any, attention_mask: Any, max_new_tokens: Any, num_draft_tokens: Any,
              sampling: Sampling, vocab: int, eos: Any, model: Any, models: Sequence[Any]
              ) -> tuple[int, list[int]]:
    """Checks the run's inputs; returns (left padding to skip, eos ids)."""
    if not isinstance(input_ids, Tensor) or input_ids.dim() != 2 or input_ids.dtype not in (torch.long, torch.int):
        raise SortedNetError("input_ids must be an integer tensor of shape (batch, length), like generate's")
    meta = [n for n, t in (("input_ids", input_ids), ("attention_mask", attention_mask), ("eos_token_id", eos))
            if isinstance(t, Tensor) and t.device.type == "meta"]
    if meta:
        raise SortedNetError(f"speculative_generate decodes real tokens: {meta} on the meta device hold no values; "
                             "pass them on the model's device")
    if input_ids.shape[0] != 1:
        raise SortedNetError(f"speculative_generate decodes one sequence at a time (batch size 1); got batch size "
                             f"{input_ids.shape[0]}: loop over the rows")
    if input_ids.shape[1] == 0 or int(input_ids.min()) < 0 or int(input_ids.max()) >= vocab:
        raise SortedNetError(f"input_ids must be a non-empty prompt of token ids in 0..{vocab - 1}")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise SortedNetError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
    if num_draft_tokens != "auto" and (isinstance(num_draft_tokens, bool) or not isinstance(num_draft_tokens, int)
                                       or num_draft_tokens < 1):
        raise SortedNetError(f"num_draft_tokens must be an int >= 1 or 'auto', got {num_draft_tokens!r}")
    s = sampling
    if s.do_sample and (isinstance(s.temperature, bool) or not isinstance(s.temperature, (int, float))
                        or not 0 < s.temperature < math.inf):
        raise SortedNetError(f"temperature must be a finite number > 0, got {s.temperature!r}")
    if s.top_k is not None and (isinstance(s.top_k, bool) or not isinstance(s.top_k, int) or s.top_k < 1):
        raise SortedNetError(f"top_k must be an int >= 1 or None, got {s.top_k!r}")
    if s.top_p is not None and (isinstance(s.top_p, bool) or not isinstance(s.top_p, (int, float))
                                or not 0 <= s.top_p <= 1):  # (0: the most likely token alone, as generate())
        raise SortedNetError(f"top_p must be in [0, 1] or None, got {s.top_p!r}")
    if s.generator is not None and not isinstance(s.generator, torch.Generator):
        raise SortedNetError(f"generator must be a torch.Generator, got {type(s.generator).__name__}")
    gen = getattr(model, "generation_config", None)
    filters = {k: getattr(gen, k, None) for k, default in _UNSUPPORTED_SAMPLING.items()
               if not _neutral(getattr(gen, k, None), default)} if s.do_sample else {}
    if filters:
        raise SortedNetError(f"the model's generation_config sets the sampling filters {filters}, which "
                             "generate(do_sample=True) applies; speculative_generate samples with temperature, "
                             "top_k and top_p only (its tokens would come from another distribution): reset them "
                             "on model.generation_config, or use model.generate")
    if eos is None:
        eos = getattr(gen, "eos_token_id", None)
    if isinstance(eos, (Tensor, np.ndarray)):
        eos = eos.tolist()
    if eos is not None and not isinstance(eos, (int, np.integer, list, tuple)):
        raise SortedNetError(f"eos_token_id must be an int or a list of ints, got {eos!r}")
    eos = [] if eos is None else [eos] if isinstance(eos, (int, np.integer)) else list(eos)
    if any(isinstance(e, bool) or not isinstance(e, (int, np.integer)) for e in eos):
        raise SortedNetError(f"eos_token_id must be an int or a list of ints, got {eos!r}")
    eos = [int(e) for e in eos]
    changed = {k: getattr(gen, k, None) for k, default in _UNSUPPORTED.items()
               if not _neutral(getattr(gen, k, None), default) and not (k in _EOS_ONLY and not eos)}
    if changed:
        raise SortedNetError(f"the model's generation_config sets {changed}, which transform the logits (or stop "
                             "the search) in generate(); speculative_generate does not apply them (its greedy output "
                             "would differ from generate's): reset them on model.generation_config, or use "
                             "model.generate")
    pad_id = getattr(gen, "pad_token_id", None)
    if attention_mask is None and isinstance(pad_id, int) and pad_id not in eos and bool((input_ids == pad_id).any()):
        attention_mask = (input_ids != pad_id).long()  # what generate() infers from a prompt holding the pad token
    pad = 0
    if attention_mask is not None:
        m = attention_mask
        if not isinstance(m, Tensor) or m.shape != input_ids.shape or not bool(((m == 0) | (m == 1)).all()):
            raise SortedNetError(f"attention_mask must be a 0/1 tensor of the prompt's shape {tuple(input_ids.shape)}")
        pad = int((m[0] == 0).sum())
        if pad == m.shape[1] or bool((m[0, :pad] != 0).any()):
            raise SortedNetError("attention_mask: only left padding (zeros before the first token) is supported"
                                 + (f" (the mask generate() infers: the prompt holds the pad token {pad_id})"
                                    if isinstance(pad_id, int) and bool((input_ids == pad_id).any()) else ""))
    for who, m in zip(("target", "draft"), models):
        limit = _positions(m)
        # the last new token is returned, never fed back: a sequence may end one past the model's positions
        if limit is not None and input_ids.shape[1] - pad + max_new_tokens > limit + 1:
            raise SortedNetError(f"prompt ({input_ids.shape[1] - pad}) + max_new_tokens ({max_new_tokens}) exceeds "
                                 f"the {who} model's {limit} learned positions ({type(m).__name__}; + 1: the last "
                                 "new token is not fed back)")
    return pad, eos


_POSITION_TABLES = ("wpe", "embed_positions", "position_embeddings")


def _positions(model: Any) -> int | None:
    """How many positions a model with a learned position table holds (GPT-2's ``wpe``, OPT's ``embed_positions``
    less its offset), or None (rotary, ALiBi, sinusoidal: no table to run past)."""
    for name, m in model.named_modules():
        if name.rpartition(".")[2] in _POSITION_TABLES and isinstance(m, nn.Embedding):
            offset = getattr(m, "offset", 0)
            return m.num_embeddings - (offset if isinstance(offset, int) else 0)
    return None


def speculative_generate(target: Any, input_ids: Tensor, *, draft: Any = None, max_new_tokens: int | None = None,
                         num_draft_tokens: int | str = 4, exits: Sequence[Any] | None = None,
                         thresholds: Sequence[float] | None = None, target_sub: Any = None,
                         share_cache: bool | None = None, do_sample: bool | None = None,
                         temperature: float | None = None, top_k: int | None = None, top_p: float | None = None,
                         generator: torch.Generator | None = None, eos_token_id: int | Sequence[int] | None = None,
                         attention_mask: Tensor | None = None, **generate_options: Any) -> SpeculativeOutput:
    """Decode with a nested (or separate sorted) draft, verified by the target: the target's own output.

    ``target``: a Nest of a causal LM (``target_sub`` picks the sub-model, default
    the one its forward runs for the caller: the enclosing ``nest.use(...)``, else
    the nest's default, the largest unless set by ``nest.activate``) or a plain
    Hugging Face causal LM. ``draft``: a sub-model of the
    same nest (``"depth=2"``; dimensions left out take the target's sizes) →
    self-speculative, sharing the KV cache of its layers when it differs from
    the target only in depth (``share_cache=None``: whenever possible); or a
    separate Nest with ``exits=[...]`` (ascending depths, one width; without
    ``exits``: its sub-model in force, like the target's) and
    ``thresholds`` (one per exit in [0, 1]; a token exits at the first exit
    whose max softmax probability reaches its threshold, else at the last) →
    the S2D cascade; or a plain causal LM. Greedy output equals the target's
    greedy ``generate``; sampling (temperature -> top-k -> top-p, randomness
    from ``generator`` only) keeps the target's distribution. ``do_sample``, ``temperature``, ``top_k``,
    ``top_p`` left out are taken as ``generate`` takes them: from the model's generation config, else greedy,
    temperature 1, top-k 50 and no top-p (``top_k=0``: no top-k filter). Batch size 1. Other options of
    ``generate`` (``repetition_penalty``, ``logits_processor``, ``stopping_criteria``, ``streamer``,
    ``num_return_sequences``, ``past_key_values``...) are refused with a :class:`~sortednet.SortedNetError`.

    >>> import torch, sortednet as sn
    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> cfg = LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
    ...                   num_attention_heads=4, num_key_value_heads=2, eos_token_id=None)
    >>> model = LlamaForCausalLM(cfg).eval()
    >>> nest = sn.from_transformers(model, depth=[2])
    >>> ids = torch.tensor([[1, 2, 3]])
    >>> out = sn.speculative_generate(nest, ids, draft="depth=2", max_new_tokens=8)
    >>> plain = model.generate(ids, max_new_tokens=8, do_sample=False)
    >>> bool((out.sequences == plain).all()), out.stats.new_tokens
    (True, 8)
    """
    if generate_options:
        own = [n for n, p in inspect.signature(speculative_generate).parameters.items() if p.kind is p.KEYWORD_ONLY]
        near = {n: difflib.get_close_matches(n, own, n=1) for n in generate_options}
        raise SortedNetError(
            f"speculative_generate does not take {sorted(generate_options)}"
            + "".join(f" (did you mean {m[0]!r} for {n!r}?)" for n, m in near.items() if m)
            + f"; its keywords are {own}. Other options of generate() (logits processors, penalties, stopping "
            "criteria, streamers, several sequences, a cache of your own) would be left out of its tokens: use "
            "model.generate for them")
    if draft is None:
        raise SortedNetError("speculative_generate needs draft=: a sub-model of the target nest (\"depth=2\"), a "
                             "separate Nest with exits=[...], or a plain causal LM")
    if max_new_tokens is None:  # (as generate(): the target model's generation_config may set it)
        held = getattr(target, "model", target) if not isinstance(target, nn.Module) else target
        max_new_tokens = getattr(getattr(held, "generation_config", None), "max_new_tokens", None)
    if max_new_tokens is None:
        raise SortedNetError("speculative_generate needs max_new_tokens=, the number of tokens to generate (or "
                             "model.generation_config.max_new_tokens)")
    if do_sample is not None:
        flag("speculative_generate", "do_sample", do_sample)
    if share_cache is not None:
        flag("speculative_generate", "share_cache", share_cache)
    for shared in (share_cache, False):  # (a shared cache left to the plan and found to misread: not shared)
        plan = make_plan(target, draft, exits=exits, thresholds=thresholds, target_sub=target_sub,
                         share_cache=shared)
        tmodel = plan.models[0]
        sampling = _sampling(getattr(tmodel, "generation_config", None), do_sample, temperature, top_k, top_p,
                             generator)
        max_new_tokens, num_draft_tokens = (_py_int(v) for v in (max_new_tokens, num_draft_tokens))  # (numpy)
        pad, eos = _validate(input_ids, attention_mask, max_new_tokens, num_draft_tokens, sampling, plan.vocab,
                             eos_token_id, tmodel, plan.models)
        with _eval_held(plan.models), ExitStack() as stack, torch.inference_mode():
            for ctx in plan.outer:
                stack.enter_context(ctx)
            _refuse_bidirectional(tmodel, plan.vocab)
            if plan.shared and _misread_logits(plan, tmodel):
                if share_cache is None:
                    continue
                raise SortedNetError(
                    f"speculative_generate(share_cache=True): a shared cache reads the target's tokens from its "
                    f"blocks, final norm and LM head, but {type(tmodel).__name__}'s own logits differ from that "
                    "reading (its forward does more after the head: a scale, a mask over part of the vocabulary, "
                    "a forward of its own), so its tokens would not be generate()'s: pass share_cache=False or "
                    "leave it out (the target then runs its own forward)")
            _refuse_padding_shift(tmodel, input_ids, pad)
            new, stats = _decode(plan, input_ids[:, pad:], max_new_tokens, num_draft_tokens, sampling, set(eos))
        break
    ids = input_ids.long()  # (as generate(): its sequences are int64 whatever the prompt's integer type)
    seq = torch.cat([ids, torch.tensor([new], dtype=ids.dtype, device=ids.device)], dim=1)
    return SpeculativeOutput(seq, stats)


def _differ(model: nn.Module, what: str, calls: tuple[Any, Any], at: Any, full: float, half: float) -> bool:
    """Whether the logits at positions ``at`` of two forwards of ``model`` (keyword arguments ``calls``, or a
    function giving the logits) differ by more than ``full`` (float32 / float64 weights) or ``half`` (16-bit)
    times their own scale, however small it is."""
    try:
        a, b = ((kw() if callable(kw) else model(**kw, use_cache=False).logits)[0, at].float() for kw in calls)
    except RESOURCE_ERRORS:
        raise
    except Exception as e:
        raise SortedNetError(f"speculative_generate: the target ({type(model).__name__}) failed on {what} "
                             f"({type(e).__name__}: {str(e)[:200]})") from e
    if a.shape != b.shape:  # (a vocabulary cut or padded after the head)
        return True
    low = next((p.dtype for p in model.parameters()), torch.float32) in (torch.float16, torch.bfloat16)
    return float((a - b).abs().max()) > (half if low else full) * float(a.abs().max())


def _refuse_bidirectional(model: nn.Module, vocab: int) -> None:
    """Refuse a target whose earlier positions see later tokens (a BERT-style ``*LMHeadModel`` with
    ``config.is_decoder=False``, ``use_bidirectional_attention=True``): verification runs several drafted tokens
    in one pass, so earlier positions would see later drafts and the tokens would differ from ``generate``'s.
    Found by running it: two 4-token prompts differing in their last token must give the same logits before it."""
    if vocab < 2:
        return
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    ids = torch.arange(1, 5, device=device).remainder(vocab).unsqueeze(0)
    other = ids.clone()
    other[0, -1] = (ids[0, -1] + 1) % vocab
    # (causal: the earlier positions compute the same ops on the same values, bitwise alike in practice)
    if _differ(model, "a 4-token prompt", ({"input_ids": ids}, {"input_ids": other}), slice(0, -1), 1e-5, 1e-3):
        raise SortedNetError(f"speculative_generate: the target ({type(model).__name__}) attends both ways: the "
                             "logits of earlier positions change with a later token (config.is_decoder=False on a "
                             "BERT-style model, use_bidirectional_attention=True, ...). Verifying several drafted "
                             "tokens in one pass would let earlier positions see later drafts: its tokens would "
                             "differ from generate()'s. Use a causal decoder (config.is_decoder=True) or "
                             "model.generate")


def _misread_logits(plan: Plan, model: nn.Module) -> bool:
    """Whether the target's logits read as a shared cache reads them (its blocks, final norm and LM head run one
    by one, not its forward) differ from its forward's: a forward that does more after the head (a scale, a mask
    over part of the vocabulary, a subclass's own ``forward``) would give other tokens than ``generate``'s.
    Found by running both on a 4-token prompt."""
    runner = plan.target.runner
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    ids = torch.arange(1, 5, device=device).remainder(plan.vocab).unsqueeze(0)
    def read() -> Tensor:
        pos = torch.arange(4, device=device).unsqueeze(0)
        return runner.logits(runner.run(ids, 0, plan.target.bounds[-1], runner.new_cache(), pos))

    return _differ(model, "a 4-token prompt", (read, {"input_ids": ids}), slice(None), 1e-4, 1e-2)


def _refuse_padding_shift(model: nn.Module, input_ids: Tensor, pad: int) -> None:
    """Decoding drops the left padding and counts positions from the first real token, as ``generate`` counts them
    for a model taking ``position_ids``. One that takes none counts them itself: from the padded start where its
    positions are learned or absolute (BART-style decoders: ``generate``'s tokens then depend on the padding),
    alike where attention is relative to the distance (ALiBi: Bloom, MPT). Found by running it: the last real
    token's logits with a few padded positions before must equal those without."""
    if not pad or "position_ids" in inspect.signature(model.forward).parameters:
        return
    real = input_ids[:, pad:][:, :8]
    n = min(pad, 4)
    padded = torch.cat([input_ids[:, :n], real], dim=1)
    mask = torch.cat([torch.zeros(1, n, dtype=torch.long), torch.ones(1, real.shape[1], dtype=torch.long)],
                     dim=1).to(input_ids.device)
    if _differ(model, "a left-padded prompt", ({"input_ids": real}, {"input_ids": padded, "attention_mask": mask}),
               -1, 1e-4, 2e-2):
        raise SortedNetError(f"attention_mask: left padding, and the target ({type(model).__name__}) takes no "
                             "position_ids and counts its positions from the padded start (its output changes with "
                             "the padding, as generate()'s does), while speculative_generate drops the padding: its "
                             "tokens would differ from generate()'s. Pass the prompt without padding")


#: per module (by id) that calls running now put in eval mode: [calls holding it, its training flag before]
_HELD: dict[int, list] = {}
_HELD_LOCK = threading.Lock()


@contextmanager
def _eval_held(models: Sequence[nn.Module]) -> Iterator[None]:
    """The models in eval mode while the call runs, their training flags back after the LAST of the calls that
    run at once on them (threads decoding with one model: the first to finish restored training mode under the
    others, which then decoded with dropout, in silence). Whatever stops it part-way (a ``train()`` override
    raising, a Ctrl-C), the counts it raised come down and the flags it changed come back."""
    mods = list({id(m): m for model in models for m in model.modules()}.values())
    taken: list[nn.Module] = []
    try:
        with _HELD_LOCK:
            for m in mods:
                held = _HELD.get(id(m))
                if held is None:
                    _HELD[id(m)] = [1, m.training]
                else:
                    held[0] += 1
                taken.append(m)
            for model in models:
                model.eval()
        yield
    finally:
        with _HELD_LOCK:
            back = []
            for m in taken:
                held = _HELD[id(m)]
                held[0] -= 1
                if held[0] == 0:
                    del _HELD[id(m)]
                    back.append((m, held[1]))
            restore_modes([(m, flag) for m, flag in back if flag])


def _draft_step(plan: Plan, buf: Tensor, pos: int) -> tuple[Tensor, int]:
    """Logits of the draft at position ``pos`` (predicting ``pos + 1``) and the exit index it left at."""
    last = len(plan.exits) - 1
    for i, (stack, j) in enumerate(plan.exits):
        h = stack.hidden(j, buf, pos + 1)
        logits = stack.logits(h[:, -1])[0]
        if i == last or float(logits.float().softmax(-1).max()) >= plan.thresholds[i]:
            return logits, i
    raise AssertionError("unreachable")


def _decode(plan: Plan, prompt: Tensor, max_new: int, k_spec: int | str, sampling: Sampling,
            eos: set[int]) -> tuple[list[int], SpeculativeStats]:
    stats = SpeculativeStats(exits={label: ExitStats() for label in plan.labels})
    auto = k_spec == "auto"
    k = 1 if auto else int(k_spec)
    most = 12 if auto else k
    n = prompt.shape[1]                      # sequence length; the last token is in no cache yet
    # the buffer grows as tokens come (generate stops at an eos long before max_new_tokens = 10**9, and a round
    # drafting k = 10**12 tokens stops at one too: no buffer of either size up front)
    buf = torch.zeros(1, n + min(max_new, 64) + min(most, max_new, 64) + 2, dtype=torch.long, device=prompt.device)

    def room(buf: Tensor, index: int) -> Tensor:
        """``buf`` with room for ``index`` (doubled past it)."""
        if index < buf.shape[1]:
            return buf
        return torch.cat([buf, buf.new_zeros(1, max(buf.shape[1], index + 1 - buf.shape[1]))], dim=1)

    buf[:, :n] = prompt
    stacks = list(dict.fromkeys([plan.target] + [s for s, _ in plan.exits]))
    out: list[int] = []
    rejections, cost_sum = 0, 0.0
    while len(out) < max_new:
        kr = min(k, max_new - len(out) - 1)
        plan.target.out.clear()
        drafted, qs, where = [], [], []
        for i in range(kr):
            logits, e = _draft_step(plan, buf, n - 1 + i)
            if sampling.do_sample:
                q = sampling.probs(logits)
                t = sampling.draw(q)
                qs.append(q)
            else:
                t = int(logits.float().argmax())
            buf = room(buf, n + i)
            buf[0, n + i] = t
            drafted.append(t)
            where.append(e)
            if t in eos:
                break
        m = len(drafted)
        buf = room(buf, n + m)  # (the target's next token goes at n + j, j <= m)
        plan.target.hidden(len(plan.target.bounds) - 1, buf, n + m)
        h = torch.cat(plan.target.out, dim=1)[:, -(m + 1):]
        tl = plan.target.logits(h)[0]
        if sampling.do_sample:
            j, nxt = _accept(sampling.probs(tl), torch.stack(qs) if qs else tl[:0], drafted, sampling.generator)
        else:
            j, nxt = accept_greedy(tl, drafted)
        tokens = drafted[:j] + [nxt]
        done = False
        for idx, t in enumerate(tokens):
            if t in eos:
                tokens, done = tokens[: idx + 1], True
                break
        verified = buf[:, : n + m].clone() if _on_round is not None else None
        buf[0, n + j] = nxt
        stats.target_forwards += 1
        stats.drafted += m
        stats.accepted += j
        stats.draft_lengths.append(m)
        for i, e in enumerate(where):
            stats.exits[plan.labels[e]].drafted += 1
            stats.exits[plan.labels[e]].accepted += i < j
            cost_sum += plan.costs[e]
        rejections += j < m
        first = n - 1
        out += tokens
        n += len(tokens)
        for s in stacks:
            s.rollback(n - 1)
        if _on_round is not None:
            _on_round(_Round(plan, verified, first, tl, n))
        if done:
            break
        if auto:
            cost = cost_sum / stats.drafted if stats.drafted else plan.costs[0]
            k = auto_draft_length(stats.accepted, rejections, cost, most)
    stats.new_tokens = len(out)
    return out, stats
