"""``transformers.Trainer`` integration: sorted training in a few lines.

:class:`SortedTrainer` draws the sub-models of each optimizer step from the
sampler with ``state.global_step`` (which only advances after an optimizer
step), so every gradient-accumulation micro-batch of a step trains the same
sub-models; the loss of a micro-batch is the mean over those sub-models (or
their SoFT loss over depth exits), back-propagated one sub-model at a time. :class:`SubModelCallback` is the
lighter-weight alternative: it activates one sub-model per step.
"""

from __future__ import annotations

import functools
import json
import math
import numbers
import os
import sys
import threading
import warnings
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from transformers import PreTrainedModel, Trainer, TrainerCallback
from transformers.trainer_callback import CallbackHandler

from .. import distributed as snd
from ..dims import Depth
from ..distributed import _ddp_type
from ..errors import SortedNetError
from ..io import load, save
from ..modes import restore_modes
from ..nest import Nest
from ..rank import Rank
from ..sampler import Sampler, _same_listing, comparable_state
from ..submodel import SubModel
from ..train import _ddp_reducer_check, checked_weights, drop_stale_calibration
from .soft import _listed, exit_parts, soft_loss

__all__ = ["SortedTrainer", "SubModelCallback", "make_sampler", "NEST_FILE"]

NEST_FILE = "sortednet.safetensors"  # the nest's own checkpoint next to a Rank nest's Hugging Face files
TRAINING_FILE = "sortednet_training.json"  # what draws the sub-models: compared when resuming


def make_sampler(nest: Nest, submodels: Sequence[SubModel] | None = None, *, k: int = 3, seed: int = 0,
                 strategy: str | None = None) -> Sampler:
    """``sn.Sampler`` over ``submodels`` (default all): ``k`` per step, "sandwich"
    (largest + smallest + random) when ``k >= 2``, else "uniform".

    >>> import torch.nn as nn, sortednet as sn
    >>> nest = sn.wrap(nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 2)), sn.Width("h", [2, 4, 8], out="0", inp="1"))
    >>> s = make_sampler(nest, k=2)
    >>> s.draw(3) == s.draw(3), len(s.draw(3))
    (True, 2)
    """
    subs = tuple(submodels) if submodels is not None else nest.submodels
    k = min(k, len(subs))
    return Sampler(subs, k=k, strategy=strategy or ("sandwich" if k >= 2 else "uniform"), seed=seed)


def _checked_sampler(nest: Nest, sampler: Any, who: str) -> Any:
    """``sampler`` when it can ``draw(step)`` and every sub-model it lists is one of the nest's."""
    if not callable(getattr(sampler, "draw", None)):
        raise SortedNetError(f"{who}(sampler=...) needs an object with draw(step) -> sub-models (e.g. "
                             f"sn.Sampler(nest.submodels, ...)), got {type(sampler).__name__}")
    subs = getattr(sampler, "submodels", None)
    if subs is not None:
        foreign = [s for s in subs if s not in nest.submodels]
        if foreign:
            raise SortedNetError(f"{who}: the sampler lists sub-models this nest does not have ({foreign[0]}, "
                                 f"{len(foreign)} in all); build it from nest.submodels")
    return sampler


def _flat(config: dict[str, Any]) -> dict[str, Any]:
    """A saved training configuration as one flat mapping (the sampler's keys and the SoFT exits)."""
    sampler = config.get("sampler")
    return {**(sampler if isinstance(sampler, dict) else {}), "soft_exits (exit, weight)": config.get("soft")}


def _unwrapped(model: Any) -> Any:
    """The module inside DDP / FSDP-style wrappers (``.module``), as far down as they go."""
    while isinstance(getattr(model, "module", None), torch.nn.Module):
        model = model.module
    return model


def _embeddings(model: torch.nn.Module, getter: str) -> Any:
    """``model.get_input_embeddings()`` / ``get_output_embeddings()``, or None where the model has none (transformers'
    base method raises NotImplementedError on a class that does not say, e.g. ``CLIPForImageClassification``)."""
    try:
        return getattr(model, getter)() if hasattr(model, getter) else None
    except NotImplementedError:
        return None


def _modules_to_save(nest: Nest, given: Sequence[str] | None, lora: bool) -> list[str]:
    """The modules that train beside LoRA adapters: ``given`` (module paths, checked), or by default a
    transformers task model's head: each child module outside its ``base_model`` (or, for a task model that is its
    own base model, outside the child holding the nested layers: Whisper's audio classifier) that holds parameters
    of its own and not the output embeddings (the classifier of ``BertForSequenceClassification``, ``score`` of
    ``LlamaForSequenceClassification``, ``qa_outputs``; a causal or masked LM's head is the output embeddings and
    stays frozen, as LoRA has it)."""
    model = nest.model
    if given is not None:
        given = _listed(given, "modules_to_save", "module paths, e.g. ['classifier']", "SortedTrainer")
        if not lora:
            raise SortedNetError("SortedTrainer(modules_to_save=...) names what trains beside LoRA adapters, and this "
                                 "nest has no Rank(mode='lora'): every parameter that requires grad trains already")
        for path in given:
            if not isinstance(path, str):
                raise SortedNetError(f"SortedTrainer(modules_to_save=...) takes module paths, got {path!r}")
            try:
                model.get_submodule(path)
            except AttributeError:
                near = [n for n, _ in model.named_modules() if n and n.split(".")[-1] == path.split(".")[-1]][:3]
                raise SortedNetError(f"SortedTrainer(modules_to_save=...): {path!r} is not a module of "
                                     f"{type(model).__name__}" + (f" (did you mean {near}?)" if near else "")) from None
            if not path:
                raise SortedNetError("SortedTrainer(modules_to_save=...): '' is the whole model, which would train "
                                     "every weight beside the adapters (a full fine-tune); name the task modules")
            for inner, bound in model.get_submodule(path).named_modules(prefix=path):  # (in the model's order)
                if inner in nest._sliced and "rank" in bound._sn.bind and getattr(
                        bound._sn.bind["rank"].dim, "mode", None) == "lora":
                    what = "is" if inner == path else f"holds {inner!r},"
                    raise SortedNetError(
                        f"SortedTrainer(modules_to_save=...): {path!r} {what} a target of the LoRA Rank "
                        f"{bound._sn.bind['rank'].dim.name!r}: its base weight stays frozen (the adapters train "
                        "it); leave it out and name the modules beside the targets, or wrap without that target")
        within = {id(p) for path in given for p in model.get_submodule(path).parameters()}
        for name, p in model.named_parameters(remove_duplicate=False):
            if id(p) in within and not any(name.startswith(path + ".") for path in given):
                owner = next(n for n, q in model.named_parameters(remove_duplicate=False)
                             if q is p and any(n.startswith(path + ".") for path in given))
                raise SortedNetError(
                    f"SortedTrainer(modules_to_save=...): {owner!r} is also {name!r} (a tied weight), which is not "
                    "named and stays frozen: training one trains both. Name the module holding it too, or untie "
                    "them")
        return list(given)
    base = getattr(model, "base_model", None)
    if not lora or not isinstance(base, torch.nn.Module):
        return []
    bodies = [base]
    if base is model:  # (a task model without a base model of its own: the children holding the nested layers,
        if "For" not in type(model).__name__:  # its input embeddings and norms are the body; a base model itself
            return []                          # has no task head)
        holders = {p.split(".")[0] for p in nest._sliced if p}
        inp = _embeddings(model, "get_input_embeddings")
        bodies = [c for n, c in model.named_children() if n in holders or c is inp or "Norm" in type(c).__name__]
    out = _embeddings(model, "get_output_embeddings")
    shared = {id(p) for b in bodies for p in b.parameters()}
    return [name for name, child in model.named_children()
            if all(child is not b for b in bodies) and any(True for _ in child.parameters())
            and not any(m is out for m in child.modules())
            and not any(id(p) in shared for p in child.parameters())]


class SortedTrainer(Trainer):
    """A ``transformers.Trainer`` that trains nested sub-models.

    ``nest``: from :func:`sortednet.from_transformers` on the trainer's model.
    ``sampler``: anything with ``draw(step) -> list[SubModel]`` (default
    :func:`make_sampler`). ``soft_exits``: if given, each drawn sub-model's
    loss is the SoFT loss over these depth exits (its own depth is replaced by
    the deepest exit), so depth costs one pass. ``history`` records
    ``(global_step, sub-models)`` for every micro-batch. ``nonfinite``: a drawn sub-model's NaN / inf loss puts
    NaN into the shared gradients, which the optimizer step spreads into every weight (and transformers' default
    ``logging_nan_inf_filter`` logs such steps as 0): ``"raise"`` (default) checks the gradients once per
    optimizer step, after the last micro-batch (and the gradient all-reduce), and stops training with a
    :class:`~sortednet.SortedNetError` naming the step, its sub-models and any whose loss was not finite, before
    the optimizer step (on every rank at once: resume from the last checkpoint with a lower learning rate or
    ``max_grad_norm``); a NaN loss whose gradients are finite (a batch without a labelled item: transformers'
    classification loss is then 0 / 0, its gradient 0) trains on. With ``fp16=True`` the gradient scaler skips
    such steps itself (and lowers its scale), so nothing is checked. ``"ignore"``: as a plain ``Trainer``.
    ``modules_to_save`` (a nest with ``Rank(mode="lora")``): the modules that train beside the adapters (set to
    require grad, even where an earlier trainer or the user froze them), every other parameter is frozen; by
    default a task model's head (a classifier, ``score``, ``qa_outputs``: a child outside ``base_model`` that is
    not the LM head), ``[]`` for the adapters alone.

    >>> import tempfile, torch, sortednet as sn
    >>> from transformers import GPT2Config, GPT2LMHeadModel, TrainingArguments
    >>> model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=50))
    >>> nest = sn.from_transformers(model, ffn=[32])
    >>> data = [{"input_ids": torch.randint(0, 50, (8,)), "labels": torch.randint(0, 50, (8,))}] * 4
    >>> args = TrainingArguments(tempfile.mkdtemp(), max_steps=1, per_device_train_batch_size=2, report_to=[],
    ...                          use_cpu=True, save_strategy="no", disable_tqdm=True)
    >>> t = SortedTrainer(model=model, args=args, train_dataset=data, nest=nest)
    >>> _ = t.train(); t.history[0][0]  # doctest: +ELLIPSIS
    {...}
    0
    """

    def __init__(self, *args: Any, nest: Nest, sampler: Any = None, soft_exits: Sequence[int] | None = None,
                 soft_weights: Sequence[float] | None = None, nonfinite: str = "raise",
                 modules_to_save: Sequence[str] | None = None, **kw: Any) -> None:
        if not isinstance(nest, Nest):
            raise SortedNetError(f"SortedTrainer(nest=...) needs a Nest, got {type(nest).__name__}")
        lora = any(d.kind == "rank" and getattr(d, "mode", None) == "lora" for d in nest.dims)
        heads = _modules_to_save(nest, modules_to_save, lora)
        if nonfinite not in ("raise", "ignore"):
            raise SortedNetError(f"SortedTrainer(nonfinite=...) is 'raise' or 'ignore', got {nonfinite!r}")
        self.nonfinite = nonfinite
        if soft_exits is None and soft_weights is not None:
            raise SortedNetError("SortedTrainer(soft_weights=...) weights the SoFT exits: it needs soft_exits=[...]")
        if soft_exits is not None:
            if soft_weights is not None and isinstance(soft_exits, (set, frozenset)):  # (weights paired with what?)
                raise SortedNetError(f"SortedTrainer: soft_exits given as a {type(soft_exits).__name__} have no order "
                                     f"to pair soft_weights with; give them as a list, in the weights' order (got "
                                     f"soft_exits={soft_exits!r})")
            exits = _listed(soft_exits.tolist() if isinstance(soft_exits, (torch.Tensor, np.ndarray)) else soft_exits,
                            "soft_exits", "exit depths, e.g. [2, 4]", "SortedTrainer")
            if not exits or any(isinstance(e, bool) or not isinstance(e, numbers.Integral) or e < 1 for e in exits):
                raise SortedNetError(f"SortedTrainer(soft_exits=...) needs whole depths >= 1 (ints), got {exits}")
            exits = [int(e) for e in exits]  # (numpy ints)
            if len(set(exits)) != len(exits):
                raise SortedNetError(f"SortedTrainer(soft_exits=...) needs distinct exits, got {exits}")
            if soft_weights is not None:
                soft_weights = _listed(soft_weights, "soft_weights", "one weight per exit", "SortedTrainer")
                if len(soft_weights) != len(exits) or any(
                        isinstance(w, bool) or not isinstance(w, numbers.Real) or not 0 <= w < math.inf
                        for w in soft_weights) or not sum(soft_weights) > 0:
                    raise SortedNetError(f"SortedTrainer(soft_weights=...) needs one finite weight >= 0 per exit of "
                                         f"soft_exits={exits} (not all 0), got {soft_weights}")
            args_ = kw.get("args", args[1] if len(args) > 1 else None)
            smoothing = getattr(args_, "label_smoothing_factor", 0) or 0
            if smoothing or kw.get("compute_loss_func") is not None:
                raise SortedNetError("SortedTrainer(soft_exits=...) computes the SoFT loss itself (plain cross-entropy "
                                     "at each exit): label_smoothing_factor and compute_loss_func would be ignored; "
                                     "drop them, or train without soft_exits")
        super().__init__(*args, **kw)
        trained = self.accelerator.unwrap_model(self.model)
        if trained is not nest.model:
            raise SortedNetError("SortedTrainer: model= must be the nest's model (nest.model)" + (
                _HOLDS_NEST.format(type(trained).__name__) if any(m is nest.model for m in trained.modules())
                else ""))
        if any(isinstance(cb, SubModelCallback) for cb in self.callback_handler.callbacks):
            raise SortedNetError("SortedTrainer draws its own sub-models each step (its sampler=); a SubModelCallback "
                                 "would only record draws that never train: drop the callback")
        self.nest = nest
        self._rank = any(d.kind == "rank" for d in nest.dims)
        self.soft_exits = exits if soft_exits is not None else None
        self.soft_weights = soft_weights
        self.history: list[tuple[int, tuple[SubModel, ...]]] = []
        self._depth = None
        if self.soft_exits is not None:
            self.loss_is_scaled_for_ga = False  # SoFT losses are per-micro-batch means: Trainer divides by GA steps
            if not hasattr(type(self), "loss_is_scaled_for_ga"):  # (a Trainer from before that attribute divides
                self.model_accepts_loss_kwargs = False            # when the model takes no loss kwargs)
            self._depth = next((d for d in nest.dims if isinstance(d, Depth)), None)
            if self._depth is not None and max(self.soft_exits) not in self._depth.sizes:
                raise SortedNetError(f"soft_exits {self.soft_exits}: the deepest exit must be a size of depth "
                                     f"dimension {self._depth.name!r} {list(self._depth.sizes)}")
        if self.soft_exits is not None:  # (a model without exits is refused here, not at the first step)
            layers = exit_parts(nest.model)[1]
            if max(self.soft_exits) > len(layers):
                raise SortedNetError(f"SortedTrainer(soft_exits={self.soft_exits}): an exit is a block count in "
                                     f"1..{len(layers)}, the model's layers")
        deepest = None if self._depth is None else max(self.soft_exits)
        if sampler is None:  # (with SoFT: the sub-models at the deepest exit, which every drawn one runs at)
            sampler = make_sampler(nest, None if deepest is None else
                                   [s for s in nest.submodels if s[self._depth.name] == deepest])
        self.sampler = _checked_sampler(nest, sampler, "SortedTrainer")
        other = sorted({s[self._depth.name] for s in getattr(self.sampler, "submodels", ())} - {deepest}) \
            if deepest is not None else []
        if other:
            raise SortedNetError(
                f"SortedTrainer(soft_exits={self.soft_exits}): every drawn sub-model runs at the deepest exit "
                f"({self._depth.name}={deepest}) and trains the shallower exits in the same pass, but the sampler "
                f"also draws {self._depth.name}={other}: those draws would become copies of others (a step could "
                f"train one sub-model twice, and history would list depths that never ran). Give a sampler over the "
                f"sub-models at {self._depth.name}={deepest}: sn.Sampler([s for s in nest.submodels if "
                f"s[{self._depth.name!r}] == {deepest}], ...) (the default when sampler= is left out)")
        if lora:  # after every check: the adapters train, and the task head (LoRA's modules_to_save), even one
            saved = {id(p): p for h in heads for p in nest.model.get_submodule(h).parameters()}  # frozen before
            keep = {id(p) for p in nest.trainable_parameters()} | saved.keys()
            for p in nest.model.parameters():
                if p.requires_grad and id(p) not in keep:
                    p.requires_grad_(False)
            for p in saved.values():
                if p.is_floating_point() or p.is_complex():
                    p.requires_grad_(True)

    def train(self, *args: Any, **kw: Any) -> Any:
        """``Trainer.train``; per-sub-model BatchNorm statistics of ``nest.calibrate`` describe the weights it is
        about to change: they are dropped, with a warning (calibrate again after training), once a checkpoint
        loads or the first step runs (a run refused before either, e.g. a resume from a checkpoint of another
        training configuration, keeps them)."""
        self._calibration_checked = False
        return super().train(*args, **kw)

    _calibration_checked = True

    def _drop_calibration(self) -> None:
        if not self._calibration_checked:
            self._calibration_checked = True
            drop_stale_calibration(self.nest, "SortedTrainer.train", stacklevel=4)

    def _training_config(self) -> dict[str, Any] | None:
        """What decides which sub-models train at each step, as JSON: the configuration of an ``sn.Sampler``
        (its state is nothing else; None for a sampler of the user's, whose state may hold progress) and the
        SoFT exits with their normalised weights, in exit order (as ``soft_loss`` uses them)."""
        if not isinstance(self.sampler, Sampler):
            return None
        soft = None
        if self.soft_exits is not None:
            given = self.soft_weights if self.soft_weights is not None else [1.0] * len(self.soft_exits)
            weights = [float(w) for w in given]
            total = sum(weights)
            soft = [[int(e), w / total] for e, w in sorted(zip(self.soft_exits, weights))]
        try:
            return json.loads(json.dumps({"sampler": self.sampler.state_dict(), "soft": soft}))
        except (TypeError, ValueError):  # (weights of a type JSON does not take: nothing to compare)
            return None

    def _check_resumed_training(self, folder: str) -> None:
        """Resuming with another sampler (seed, k, strategy, sub-model list) or other SoFT exits would train
        other sub-models from here on than the run that wrote the checkpoint, silently: refused, before
        anything loads."""
        path = os.path.join(folder, TRAINING_FILE)
        mine = self._training_config()
        if mine is None or not os.path.exists(path):  # (a checkpoint of an earlier version: nothing to compare)
            return
        with open(path) as f:
            saved = json.load(f)
        n = len(self.sampler.submodels)  # (options an earlier version took that change no draw; the seed of 'all')
        if isinstance(saved, dict) and isinstance(saved.get("sampler"), dict):
            saved = {**saved, "sampler": comparable_state(saved["sampler"], n)}
        if isinstance(mine.get("sampler"), dict):
            mine = {**mine, "sampler": comparable_state(mine["sampler"], n)}
        theirs, ours = saved.get("sampler") if isinstance(saved, dict) else None, mine.get("sampler")
        if isinstance(theirs, dict) and isinstance(ours, dict) and isinstance(theirs.get("submodels"), list) \
                and theirs["submodels"] != ours.get("submodels") \
                and _same_listing(theirs["submodels"], self.sampler.submodels):  # (the same sub-models, their
            saved = {**saved, "sampler": {**theirs, "submodels": ours.get("submodels")}}  # dimensions in another
            #                                                                            order)
        if saved != mine:
            a, b = _flat(saved), _flat(mine)
            keys = sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))
            diff = "; ".join(f"{k}: checkpoint {str(a.get(k))[:60]}, now {str(b.get(k))[:60]}" for k in keys[:4])
            what = ("the drawn sub-models' losses would be weighted otherwise" if set(keys) <= {"loss_weights"}
                    else "other sub-models would train")
            raise SortedNetError(f"SortedTrainer: resuming from {folder!r} with another training configuration "
                                 f"than the run that wrote it ({diff}): from here on {what} than in that run. "
                                 "Build the sampler as then (sampler.load_state_dict(json.load("
                                 f"open({path!r}))['sampler'])), or delete that file to resume with the new one on "
                                 "purpose")

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """The training configuration goes into :data:`TRAINING_FILE` (resuming compares it). A Rank nest's
        parameters are factors / adapters, which ``from_pretrained`` would drop or re-initialise: its
        checkpoints hold the largest sub-model merged into stock weights (the Hugging Face files, loaded by
        ``from_pretrained`` as that sub-model) and the nest itself (:data:`NEST_FILE`, what resuming loads).
        Other nests keep their stock keys and shapes: Trainer's own files."""
        config = self._training_config()
        folder = output_dir if output_dir is not None else self.args.output_dir
        if not self._rank:
            super()._save(output_dir, state_dict)
        else:
            from .transformers import export_pretrained

            merged = export_pretrained(self.nest, self.nest.largest).state_dict()
            super()._save(output_dir, state_dict=merged)
            if self.args.should_save:
                save(self.nest, os.path.join(folder, NEST_FILE))
        if config is not None and self.args.should_save:  # (after the weights: a folder stopped before them
            os.makedirs(folder, exist_ok=True)            # holds no file of ours either)
            with open(os.path.join(folder, TRAINING_FILE), "w") as f:
                json.dump(config, f, indent=1)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Any = None) -> None:
        self._check_resumed_training(resume_from_checkpoint)
        if os.path.isdir(resume_from_checkpoint):  # (weights about to load; a missing folder is refused unloaded)
            self._drop_calibration()
        if not self._rank:
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        self._load_nest(resume_from_checkpoint)

    def _load_best_model(self) -> None:
        if not self._rank:
            return super()._load_best_model()
        self._load_nest(self.state.best_model_checkpoint)

    def _load_nest(self, folder: str) -> None:
        path = os.path.join(folder, NEST_FILE)
        if not os.path.exists(path):
            raise SortedNetError(f"SortedTrainer: {folder!r} has no {NEST_FILE}: a Rank nest resumes from the "
                                 "nest's own checkpoint (its Hugging Face files hold merged weights, which loading "
                                 "into the factors / adapters would count twice); resume from a checkpoint "
                                 "SortedTrainer wrote")
        load(self.nest, path)

    def draw(self) -> list[SubModel]:
        """The sub-models of the current optimizer step (same for all its micro-batches)."""
        step = self.state.global_step
        drawn = self.sampler.draw(step)
        if isinstance(drawn, (str, bytes, dict, SubModel)) or not isinstance(drawn, Iterable):
            raise SortedNetError(f"sampler.draw({step}) must return a list of sub-models, got "
                                 f"{type(drawn).__name__} {drawn!r}")
        subs = list(drawn)
        if not subs:
            raise SortedNetError(f"sampler drew no sub-model at step {step}")
        seen: set[SubModel] = set()
        deepest = max(self.soft_exits) if self.soft_exits is not None and self._depth is not None else None
        for sub in subs:
            got = self.nest.resolve(sub)  # (a SubModel, a dict or a string: one sub-model however spelled)
            if got in seen:  # (as sn.accumulate refuses: the same list trained twice at twice the weight)
                drawn = [str(s) for s in subs]
                raise SortedNetError(f"SortedTrainer: the sampler drew {got} twice at step {step} ({drawn}): "
                                     "it would train twice, at twice the weight of the others; draw each sub-model "
                                     "once per step (weigh it with the sampler's loss_weights_for instead)")
            if deepest is not None and got[self._depth.name] != deepest:  # (a sampler of the user's own, with no
                raise SortedNetError(                                      # .submodels the constructor could read)
                    f"SortedTrainer(soft_exits={self.soft_exits}): the sampler drew {got} at step {step}, but every "
                    f"drawn sub-model runs at the deepest exit ({self._depth.name}={deepest}) and trains the "
                    "shallower exits in the same pass: this draw would become a copy of another (trained twice, "
                    f"and listed in history at a depth that never ran). Draw sub-models at {self._depth.name}="
                    f"{deepest} only")
            seen.add(got)
        return subs  # (as drawn: history and loss_weights_for get the sampler's own spellings; resolved to train)

    def training_step(self, model: torch.nn.Module, inputs: dict[str, Any], num_items_in_batch: Any = None
                      ) -> torch.Tensor:
        """One forward + backward per drawn sub-model (each loss scaled by 1/k, or by the sampler's
        ``loss_weights_for(subs)`` when it has loss weights), so only one sub-model's graph is alive
        at a time: peak memory is that of one step, not k."""
        if num_items_in_batch is not None and self._loss_uses_items is None:
            self._loss_uses_items = _agreed(self._check_loss_kwargs(model, inputs, num_items_in_batch))
            if self._loss_uses_items is False:  # the Trainer then divides by the accumulation steps itself
                if self.compute_loss_func is None:
                    self.model_accepts_loss_kwargs = False
                elif hasattr(type(self), "loss_is_scaled_for_ga"):
                    self.loss_is_scaled_for_ga = False
                elif self.args.gradient_accumulation_steps > 1:
                    raise SortedNetError(
                        "SortedTrainer(compute_loss_func=...): the function ignores num_items_in_batch, and this "
                        "transformers' Trainer never divides its loss by gradient_accumulation_steps: each step "
                        f"would be {self.args.gradient_accumulation_steps}x the mean. Divide a sum of the "
                        "per-token losses by num_items_in_batch in it, or upgrade transformers")
        try:
            subs, error = self.draw(), None
        except SortedNetError as e:  # (refused on this rank: on several, passed through the agreement below, so
            if _ranks() == 1:         # that every rank raises and none waits in its next collective)
                raise
            subs, error = [], e
        if _ranks() > 1:  # ranks that drew other sub-models (a seed per rank) would average their gradients
            names = ([str(self.nest.resolve(s)) for s in subs] + [f"nest={snd._nest_digest(self.nest)}"]
                     if error is None else [f"refused: {error}"])  # (nest=: the same names slicing other modules
            try:                                                   # on a rank would average two networks' gradients)
                snd._agree_on(names, None, f"the sub-models (and the nest) of step {self.state.global_step}",
                              "give every rank's sampler the same seed (SortedTrainer draws by the global step) and "
                              "the same nest (nest=: a digest of its dimensions and of the modules they slice)")
            except SortedNetError:
                if error is not None:
                    raise error from None
                raise
            if error is not None:  # (the same refusal on every rank: each raises its own)
                raise error
        self._drop_calibration()
        self.history.append((self.state.global_step, tuple(  # (a copy of a dict the sampler may reuse and change)
            dict(s) if isinstance(s, Mapping) and not isinstance(s, SubModel) else s for s in subs)))
        weigh = getattr(self.sampler, "loss_weights_for", None)
        weights = weigh(subs) if weigh is not None else None
        weights = [1.0 / len(subs)] * len(subs) if weights is None else checked_weights(  # (as accumulate's)
            weights, len(subs), f"SortedTrainer: sampler.loss_weights_for({[str(s) for s in subs]})")
        total = None
        ddp = model if isinstance(model, _ddp_type()) else None
        if ddp is not None:
            snd.guard(ddp, self.nest)  # any forward that would reach DDP's reducer raises instead
        own = self.__dict__.get("compute_loss")  # (one the user set on the instance: wrapped the same way)
        self.compute_loss = functools.partial(self._scaled_loss, self.compute_loss)
        try:
            with snd.no_sync(ddp):  # one agreed all-reduce per step, not DDP's reducer (docs/scaling.md)
                for sub, w in zip(subs, weights):
                    sub = self.nest.resolve(sub)  # (a dict or text the sampler drew: checked by draw())
                    if self.soft_exits is not None and self._depth is not None:
                        sub = sub.replace(**{self._depth.name: max(self.soft_exits)})
                    self._k = 1.0 / w if w > 0 else float("inf")  # _scaled_loss divides by it
                    self._sub = sub
                    with self.nest.use(sub):
                        loss = super().training_step(model, inputs, num_items_in_batch)
                    total = loss if total is None else total + loss
        finally:
            self._k = None
            if own is None:
                del self.compute_loss
            else:
                self.compute_loss = own
        if self.accelerator.sync_gradients:  # last micro-batch of the optimizer step: one all-reduce
            snd.sync_gradients(self.nest.model)  # (a no-op in one process)
            if ddp is not None:  # DDP's pre-forward buffer broadcast, which no_sync skipped
                snd.sync_buffers(ddp)
            self._check_gradients()
        return total

    _losses: list[tuple[Any, torch.Tensor]] = []

    def _check_gradients(self) -> None:
        """Refuse the optimizer step over non-finite gradients (``nonfinite="raise"``), on every rank at once."""
        losses, self._losses = self._losses, []
        if self.nonfinite != "raise" or getattr(self.accelerator, "scaler", None) is not None:
            return  # (fp16's gradient scaler skips a step whose scaled gradients overflowed: that is its job)
        flags = []
        for p in self.nest.model.parameters():
            g = p.grad
            if g is not None:
                g = g.to_local() if hasattr(g, "to_local") else g  # (an FSDP2 shard: this rank's part)
                flags.append(torch.isfinite(g).all())
        bad = bool(flags) and not bool(torch.stack([f.to(flags[0].device) for f in flags]).all())  # (one sync;
        #                                                                   a model split over devices too)
        if _ranks() > 1:
            bad, _ = snd._loss_agreement(bad, False, None)
        if bad:
            by_sub: dict[str, list[float]] = {}  # (a sub-model drawn in several micro-batches: named once)
            for sub, v in losses:
                if not bool(torch.isfinite(v).all()):
                    by_sub.setdefault(str(sub), []).append(float(v.float()))
            seen = [f"{sub} was {vs[0]}" if len(vs) == 1 else f"{sub} was {', '.join(map(str, vs))} (in {len(vs)} "
                    "micro-batches)" for sub, vs in by_sub.items()]
            step = self.state.global_step
            subs = sorted({str(s) for st, ss in self.history if st == step for s in ss})
            raise SortedNetError(
                f"SortedTrainer: step {step} (sub-models {subs}) left non-finite gradients"
                + (f"; on this rank the loss of {', '.join(seen)}" if seen else "")
                + ": the optimizer step would spread them into every shared weight. Stopped before it: resume "
                "from the last checkpoint with a lower learning rate or max_grad_norm, or check the batch; "
                "SortedTrainer(nonfinite='ignore') steps anyway, as a plain Trainer would")

    _loss_uses_items: bool | None = None

    def _check_loss_kwargs(self, model: torch.nn.Module, inputs: dict[str, Any], n: Any) -> bool | None:
        """Whether the loss the step trains on divides by ``num_items_in_batch``. The Trainer passes it to every
        model whose forward takes ``**kwargs`` and then skips dividing by the accumulation steps; a loss that
        ignores it (transformers' sequence classification, question answering, any loss computed inline: in the
        model, or in a subclass's ``compute_loss``) would make each micro-batch's mean count in full: with
        ``gradient_accumulation_steps=g``, g times the step.
        Measured once, on the first micro-batch: the loss computed twice in eval mode, given ``n`` and ``2 n``
        items (the model's forward without gradients, or this trainer's ``compute_loss`` where a subclass or the
        instance replaced it, with gradients as in a step: it may take ``autograd.grad``). A loss that comes
        back the same ignores it: the Trainer is then told the model takes no loss kwargs (it divides by the
        accumulation steps, as for any such model). One that halves divides by it. One that changes otherwise
        divides part of itself (a term added to the token mean: a router loss, a regulariser): the token
        weighting is kept and :class:`PartlyScaledLossWarning` says that the other part counts once per
        micro-batch. A ``compute_loss_func`` is measured the same way (through ``compute_loss``, which calls it):
        the Trainer never divides its loss by the accumulation steps, so one that ignores the count is divided
        (``loss_is_scaled_for_ga = False``)."""
        func = self.compute_loss_func is not None  # (the Trainer never divides its loss by the accumulation steps)
        own = "compute_loss" in self.__dict__ or type(self).compute_loss is not SortedTrainer.compute_loss or func
        if getattr(self, "loss_is_scaled_for_ga", None) is not None or self.soft_exits is not None or not func and (
                not self.model_accepts_loss_kwargs or self.label_smoother is not None
                or ("labels" not in inputs and not own)):
            return True
        inputs = self._prepare_inputs(inputs)

        def measure(items: Any, through_override: bool) -> float:
            with torch.random.fork_rng(devices=[]):
                if through_override:
                    with torch.enable_grad():  # (as in a step: the override may differentiate)
                        out = self.compute_loss(model, dict(inputs), num_items_in_batch=items)
                    loss = out[0] if isinstance(out, tuple) else out
                else:
                    with torch.no_grad():
                        out = model(**inputs, num_items_in_batch=items)
                    loss = out["loss"] if isinstance(out, dict) else out[0]
            return float(loss.detach().float())

        modes = [(m, m.training) for m in model.modules()]
        try:  # eval mode: no dropout, no BatchNorm statistics updated by these two extra forwards
            model.eval()
            try:
                losses = [measure(items, own) for items in (n, n * 2)]
            except Exception:  # (an override that cannot run outside a step: the model's own loss decides)
                if func or not own or "labels" not in inputs:
                    raise
                losses = [measure(items, False) for items in (n, n * 2)]
        finally:
            restore_modes(modes)
        if not all(math.isfinite(v) and v != 0 for v in losses):  # (no labelled token here: undecided, the next
            return None                                           # micro-batch measures again)
        if math.isclose(losses[0], losses[1], rel_tol=1e-6, abs_tol=0.0):
            return False
        if (not math.isclose(losses[1], losses[0] / 2, rel_tol=1e-5, abs_tol=0.0)
                and self.args.gradient_accumulation_steps > 1):  # (one micro-batch per step: counted once)
            warnings.warn(
                f"SortedTrainer: the loss divides only part of itself by num_items_in_batch (measured: "
                f"{losses[0]:.6g} with {int(n)} items, {losses[1]:.6g} with twice as many; a term added to the "
                "token mean, such as a router or regularisation loss; or a loss whose value changes from call to "
                "call, by a counter or randomness of its own, which this measure cannot tell): the token weighting "
                "is kept, and that term "
                "counts once per micro-batch, gradient_accumulation_steps times per step, as in the stock Trainer. "
                "Divide it by self.args.gradient_accumulation_steps in compute_loss for the mean",
                PartlyScaledLossWarning, stacklevel=3)
        return True

    def compute_loss(self, model: torch.nn.Module, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: Any = None) -> Any:
        """The active sub-model's loss, as a plain Trainer's (with SoFT exits during training: the exits' loss).
        A subclass may override it as for any Trainer: the step divides whatever it returns by ``k`` (or weighs
        it), calling ``super().compute_loss`` or not."""
        if getattr(self, "_k", None) is None or self.soft_exits is None:
            self._ran_own = True
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        self._ran_own = True  # every model input goes to the exits' forward, as without SoFT
        rest = {key: v for key, v in inputs.items() if key != "labels"}
        loss = soft_loss(self.nest, exits=self.soft_exits, weights=self.soft_weights, labels=inputs.get("labels"),
                         **rest).loss
        return (loss, None) if return_outputs else loss

    _ran_own = False

    def _scaled_loss(self, compute: Any, *args: Any, **kw: Any) -> Any:
        """What ``Trainer.training_step`` calls as ``self.compute_loss`` during a sorted step: the trainer's
        ``compute_loss`` (a subclass's override too, which need not call ``super()``), its loss divided by ``k``
        (or weighed by the sampler's loss weights), before the Trainer's backward."""
        self._ran_own = False
        out = compute(*args, **kw)
        if self.soft_exits is not None and not self._ran_own:
            raise SortedNetError(f"SortedTrainer(soft_exits={self.soft_exits}): {type(self).__name__}.compute_loss "
                                 "returned without calling super().compute_loss, which computes the loss over the "
                                 "exits: the exits would not train. Call super().compute_loss (and add your terms "
                                 "to its loss), or leave soft_exits out")
        loss = (out[0] if isinstance(out, tuple) else out) / self._k
        if self.nonfinite == "raise":  # (looked at only if the step's gradients are not finite: no sync here)
            self._losses = [*self._losses, (getattr(self, "_sub", None), loss.detach())]
        return (loss, *out[1:]) if isinstance(out, tuple) else loss


class PartlyScaledLossWarning(UserWarning):
    """The loss SortedTrainer measured divides only part of itself by ``num_items_in_batch`` (see
    ``SortedTrainer._check_loss_kwargs``)."""


def _ranks() -> int:
    dist = torch.distributed
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _agreed(mine: bool | None) -> bool | None:
    """``SortedTrainer._check_loss_kwargs``'s verdict, the same on every rank (one all_reduce): a rank whose
    first micro-batch had no labelled token is undecided, and on its own it would keep counting
    ``num_items_in_batch`` (a collective) while the others stopped: unmatched collectives, a hang."""
    if _ranks() == 1:
        return mine
    dist = torch.distributed
    t = torch.tensor([mine is True, mine is False], dtype=torch.int64, device=snd._collective_device(None))
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    uses, ignores = bool(t[0]), bool(t[1])
    if uses and ignores:
        raise SortedNetError("SortedTrainer: the ranks disagree on whether the model's loss divides by "
                             "num_items_in_batch (measured on each rank's first micro-batch); set "
                             "trainer.model_accepts_loss_kwargs yourself")
    return True if uses else False if ignores else None


#: the refusal's words for a Trainer's model that holds the nest's model (a seq2seq model with one tower nested)
_HOLDS_NEST = (": this {} holds it (one tower of an encoder-decoder model nested), which the Trainer integration "
               "does not train (its loss, saving and checks are the nest's model's). Train it in a loop of your own "
               "with sn.accumulate(nest, subs, lambda: model(**batch).loss): under nest.use the whole model runs "
               "the tower's sub-model; or nest the whole model where from_transformers takes it (T5)")


class _Healer:
    """:class:`SubModelCallback`'s forward pre-hook: a copy of the model (an EMA / teacher ``copy.deepcopy``)
    shares it, the callback not copied (a nest cannot be copied: every copy of the model was refused while the
    hook held a bound method of the callback), and heals the nest it follows alike; an export (``nest.export``,
    a model of its own) and a pickle of the model carry none. It holds the callback while it is on the model: a
    forward after an exception ended ``trainer.train()`` inside a step restores the sub-model even where the
    trainer and the callback are otherwise gone."""

    __slots__ = ("callback",)
    sn_training_only = True  # (export drops it)

    def __init__(self, callback: Any = None) -> None:
        self.callback = callback

    def __call__(self, module: Any, args: Any) -> None:
        if self.callback is not None:
            self.callback._heal(module, args)

    def __deepcopy__(self, memo: dict) -> _Healer:
        return self  # (export drops it from its copy: sn_training_only)

    def __reduce__(self) -> tuple:
        return (_Healer, ())


class SubModelCallback(TrainerCallback):
    """Activates one drawn sub-model per optimizer step in a stock ``Trainer``.

    At each step begin, the first sub-model of ``sampler.draw(global_step)``
    becomes the nest-wide default; all micro-batches of the step use it. At
    each step end (before any evaluation or checkpoint) and at train end, the
    sub-model active when training began (by default the largest) is restored.
    An exception that ends ``trainer.train()`` inside a step reaches no
    callback: the model's next forward outside that training loop (an
    evaluation, a generation) restores that sub-model first.

    >>> import torch.nn as nn, sortednet as sn
    >>> nest = sn.wrap(nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 2)), sn.Width("h", [2, 8], out="0", inp="1"))
    >>> SubModelCallback(nest).sampler.draw(0)[0] in nest.submodels
    True
    """

    def __init__(self, nest: Nest, sampler: Any = None) -> None:
        if not isinstance(nest, Nest):
            raise SortedNetError(f"SubModelCallback(nest, ...) needs a Nest, got {type(nest).__name__}")
        self.nest = nest
        self.sampler = _checked_sampler(nest, sampler, "SubModelCallback") if sampler is not None \
            else make_sampler(nest, k=1)
        drawn = len(self.sampler.draw(0))
        if drawn != 1:
            raise SortedNetError(f"SubModelCallback trains one sub-model per optimizer step, but the sampler draws "
                                 f"{drawn}; give it a k=1 sampler, or use SortedTrainer for several per step")
        self.history: list[tuple[int, SubModel]] = []
        self._open: tuple[int, int, Any] | None = None  # the step in progress: (thread, its loop's frame id, code)
        self._hook: Any = None

    def _heal(self, module: Any, args: Any) -> None:
        """Forward pre-hook: a step whose training loop is no longer running (an exception left
        ``trainer.train()`` between step begin and end) gives back the sub-model active before training."""
        step = self._open
        if step is None or step[0] != threading.get_ident():  # (autograd threads: the step's own recomputations)
            return
        _ddp_reducer_check(self.nest, "SubModelCallback", (
            "Transformers builds DDP so when gradient checkpointing is on or ddp_find_unused_parameters=False: set "
            "TrainingArguments(ddp_find_unused_parameters=True) (with gradient checkpointing also "
            "gradient_checkpointing_kwargs={'use_reentrant': False}), or train with SortedTrainer"))
        f = sys._getframe(1)
        while f is not None:
            if id(f) == step[1] and f.f_code is step[2]:
                return
            f = f.f_back
        self._open = None
        self.nest.activate(getattr(self, "_outside", self.nest.largest))
        if self._hook is not None:  # (healed: nothing more to watch until a train() adds it again)
            self._hook.remove()
            self._hook = None

    def on_train_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        model = kw.get("model")
        if model is not None and _unwrapped(model) is not self.nest.model:
            if any(m is self.nest.model for m in _unwrapped(model).modules()):
                raise SortedNetError("SubModelCallback: the Trainer's model must be the nest's model"
                                     + _HOLDS_NEST.format(type(_unwrapped(model)).__name__))
            raise SortedNetError(f"SubModelCallback: the Trainer trains a {type(model).__name__} that is not the "
                                 "nest's model: its steps would train the full model while the callback records draws; "
                                 "pass model=nest.model to the Trainer (with model_init, wrap the model it returns)")
        self._refuse_outer_use("trainer.train()")
        save = getattr(args, "save_strategy", "no")
        ranks = [d.name for d in self.nest.dims if isinstance(d, Rank)]
        if ranks and str(getattr(save, "value", save)) != "no" and isinstance(self.nest.model, PreTrainedModel):
            raise SortedNetError(f"SubModelCallback: the nest has the Rank dimension(s) {ranks}, and this Trainer "
                                 f"saves checkpoints (save_strategy={str(getattr(save, 'value', save))!r}), whose "
                                 "save_pretrained would write factors / adapters that from_pretrained re-initialises "
                                 "(refused at the first checkpoint, after training up to it): train with "
                                 "SortedTrainer, which saves such a nest, or set save_strategy='no'")
        if self._open is not None:  # a step of an earlier train() that raised, never healed by a forward
            self._open = None
            self.nest.activate(getattr(self, "_outside", self.nest.largest))
        self._outside = self.nest.active  # what evaluation, saving and the end of training see
        if self._hook is None:
            self._hook = self.nest.model.register_forward_pre_hook(_Healer(self), prepend=True)

    def _refuse_outer_use(self, where: str) -> None:
        """The callback sets the nest-wide default (``activate``), which a ``use`` block open in the training
        loop's context overrides: every step would train that block's sub-model while the history records the
        draws. Refused before the step trains."""
        st = self.nest._state
        if st._scoped is not st:  # (Active.plan: a use block's plan is in force in this context)
            raise SortedNetError(f"SubModelCallback: {where} runs inside `with nest.use({self.nest.active})`, which "
                                 "overrides the sub-model the callback activates at each step: every step would "
                                 f"train {self.nest.active} while the callback records its draws. Call "
                                 "trainer.train() outside use blocks (or train with SortedTrainer, which enters a "
                                 "use block per drawn sub-model)")

    def on_step_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        self._refuse_outer_use(f"step {state.global_step}")
        f = sys._getframe(1)
        while f is not None and f.f_globals.get("__name__") == CallbackHandler.__module__:
            f = f.f_back  # the training loop that called the callback handler
        drawn = self.sampler.draw(state.global_step)
        if len(drawn) != 1:  # (checked at every step: a sampler of one's own may draw otherwise later)
            raise SortedNetError(f"SubModelCallback trains one sub-model per optimizer step, but the sampler drew "
                                 f"{len(drawn)} at step {state.global_step} ({[str(s) for s in drawn][:4]}); give it "
                                 "a k=1 sampler, or use SortedTrainer for several per step")
        sub = self.nest.activate(drawn[0])
        self._open = None if f is None else (threading.get_ident(), id(f), f.f_code)
        self.history.append((state.global_step, sub))

    def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        # evaluation / checkpoints between steps score the same sub-model every time, not the last one drawn
        self._open = None
        self.nest.activate(getattr(self, "_outside", self.nest.largest))

    def on_train_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        self._open = None
        self.nest.activate(getattr(self, "_outside", self.nest.largest))
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
