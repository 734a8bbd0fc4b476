"""Data-parallel training (DDP, FSDP2) on 2 CPU ranks (gloo), spawned once by this module.

Every scenario trains 20 sorted steps on 2 ranks and is compared with one
process training on the same global batches with the same drawn sub-models.
Sliced tensors of every size use the in-place gradient hook
(``INPLACE_MIN_NUMEL = 0``): the gradient node of a sliced parameter then runs without a gradient of its
own, and only ``.grad`` holds what the slices added.
"""

from __future__ import annotations

import copy
import datetime
import fcntl
import os
import socket
import time
from contextlib import nullcontext

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

import sortednet as sn
import sortednet.distributed as snd
import sortednet.slicers as slicers
from models import FAMILIES as BASE
from sortednet.importance import sort_units

WORLD, STEPS, GLOBAL_BATCH, LR = 2, 20, 4, 0.05


def _rank_mlp(mode: str):
    def build(seed: int = 0):
        case = BASE["mlp"](seed)
        case.dims.append(sn.Rank("rank", [1, 2, 5], targets="fc3", mode=mode))
        return case

    return build


FAMILIES = {**BASE, "mlp_rank_svd": _rank_mlp("svd"), "mlp_rank_lora": _rank_mlp("lora")}

# name -> (family, how the ranks synchronise)
SCENARIOS = {
    "mlp-ddp": ("mlp", "ddp"),                   # DDP + sn.distributed.accumulate (default path)
    "lm-ddp": ("lm_width_heads_depth", "ddp"),   # ... with depth-skipped blocks
    "cnn-ddp": ("cnn_bn_residual", "ddp"),
    "lm-plain": ("lm_width_heads_depth", "plain"),       # no DDP wrapper: accumulate + sync_gradients
    "lm-ddp-unused": ("lm_width_heads_depth", "ddp_unused"),  # inplace_grad=False, find_unused, no_sync but last
    "mlp-fsdp2": ("mlp", "fsdp2"),
    "lm-fsdp2": ("lm_width_heads_depth", "fsdp2_blocks"),  # blocks sharded one by one, some skipped by depth
    # ... + MixedPrecisionPolicy(reduce_dtype=float64) and two micro-batches, the first under snd.no_sync
    # (torch 2.13 FSDP2 crashed on blocks never gathered before: accumulate gathers each unit once)
    "lm-fsdp2-mp-micro": ("lm_width_heads_depth", "fsdp2_blocks_mp_micro"),
    "encoder-fsdp2": ("torch_encoder", "fsdp2"),   # nn.MultiheadAttention heads (its forward is replaced)
    # a BatchNorm cut by the width: FSDP2 puts its parameters back with setattr (the sliced BatchNorm's class has its
    # own __setattr__), whose register_parameter read the sharded weight through the slicer: refused at h < full
    "cnn-fsdp2": ("cnn_bn_residual", "fsdp2"),
    "rank-svd-ddp": ("mlp_rank_svd", "ddp"),         # weight replaced by factors U, V
    "rank-lora-fsdp2": ("mlp_rank_lora", "fsdp2"),   # frozen base weights next to trained adapters in one unit
    "lm-ddp-compiled": ("lm_width_heads_depth", "ddp_compiled"),  # torch.compile(DDP(model)) as module=
}


def _batch(family: str, step: int) -> torch.Tensor:
    example = FAMILIES[family]().example
    g = torch.Generator().manual_seed(1000 + step)
    shape = (GLOBAL_BATCH, *example.shape[1:])
    if example.dtype == torch.long:
        return torch.randint(0, 20, shape, generator=g)
    return torch.randn(shape, generator=g)


def _loss(out: torch.Tensor) -> torch.Tensor:
    return (out - 0.5).square().mean()  # a mean over the batch: the mean of equal shards' means


def _build(family: str, mode: str):
    case = FAMILIES[family](seed=0)
    nest = sn.wrap(case.model, *case.dims, inplace_grad=mode != "ddp_unused")
    if family == "mlp_rank_lora":  # adapters as a resumed run has them: wrap starts B at zero, which hid FSDP2
        g = torch.Generator().manual_seed(7)  # writing B·A into the frozen base weight at its first forward
        with torch.no_grad():
            for name, p in case.model.named_parameters():
                if name.endswith("lora_B"):
                    p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return case, nest


def _sampler(nest) -> sn.Sampler:
    return sn.Sampler(nest.submodels, k=min(3, len(nest.submodels)), seed=11)


def _optimizer(params) -> torch.optim.Optimizer:
    # weight decay: a parameter whose grad wrongly became zeros instead of None would still move
    return torch.optim.SGD(params, lr=LR, momentum=0.9, weight_decay=0.01)


def _train_rank(rank: int, family: str, mode: str, ckpt: str) -> dict:
    case, nest = _build(family, mode)
    model = case.model
    if mode == "ddp":
        module = DDP(model)
    elif mode == "ddp_compiled":  # the compiled wrapper is what the closure calls and what accumulate gets
        module = torch.compile(DDP(model), backend="eager")
    elif mode == "ddp_unused":
        module = DDP(model, find_unused_parameters=True)
    elif mode.startswith("fsdp2"):
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mesh = init_device_mesh("cpu", (WORLD,))
        mp_policy = MixedPrecisionPolicy(reduce_dtype=torch.float64) if mode.endswith("_mp_micro") else None
        kw = {"mesh": mesh, **({"mp_policy": mp_policy} if mp_policy else {})}
        for blocks in [m for m in model.modules()
                       if isinstance(m, torch.nn.ModuleList) and mode.startswith("fsdp2_blocks")]:
            for blk in blocks:  # one FSDP unit per block: depth-skipped blocks are never gathered
                fully_shard(blk, **kw)
        module = fully_shard(model, **kw)
    else:
        module = model
    opt = _optimizer(nest.trainable_parameters())  # after sharding: the DTensor parameters
    sampler = _sampler(nest)
    draws = []
    for step in range(STEPS):
        subs = sampler.draw(step)
        snd.check_submodels(subs)  # raises on disagreement
        draws.append([str(s) for s in subs])
        x = _batch(family, step).chunk(WORLD)[rank]
        closure = lambda: _loss(module(x))  # noqa: B023,E731
        if mode == "ddp_unused":  # the documented alternative: DDP's reducer on the last backward only
            for i, s in enumerate(subs):
                with module.no_sync() if i < len(subs) - 1 else nullcontext(), nest.use(s):
                    (closure() / len(subs)).backward()
        elif mode.endswith("_micro"):  # two equal micro-batches, each loss halved: the same mean gradient
            first, second = x.chunk(2)
            with snd.no_sync(module):
                snd.accumulate(nest, subs, lambda: _loss(module(first)) / 2, module=module)  # noqa: B023
            snd.accumulate(nest, subs, lambda: _loss(module(second)) / 2, module=module)  # noqa: B023
        else:
            snd.accumulate(nest, subs, closure, module=module)
        opt.step()
        opt.zero_grad(set_to_none=True)
    snd.save(nest, ckpt)
    if mode.startswith("fsdp2"):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    else:
        state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    every: list = [None] * WORLD
    dist.all_gather_object(every, draws)  # each rank's own record, compared by the test
    return {"draws": every, "state": state}


def _errors(rank: int, out_dir: str) -> dict:
    """Misuse that must raise SortedNetError on every rank (collectives stay matched)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    out = {}
    costs = {}  # parameter counts before and after fully_shard (sharded weights are read whole)
    for fam in ("mlp", "lm_width_heads_depth"):
        case = FAMILIES[fam](seed=0)
        nest = sn.wrap(case.model, *case.dims)
        budget = sorted(nest.cost(s) for s in nest.submodels)[len(nest.submodels) // 2]
        before = [nest.cost(s) for s in nest.submodels] + [str(nest.pick(params=budget))]
        fully_shard(case.model, mesh=init_device_mesh("cpu", (WORLD,)))
        try:  # (pick took FSDP2's state on each module for plain attributes holding sliced tensors: refused)
            picked = str(nest.pick(params=budget))
        except sn.SortedNetError as e:
            picked = str(e)
        costs[fam] = (before, [nest.cost(s) for s in nest.submodels] + [picked])
        if fam == "mlp":  # a read of a sharded parameter at rest that the sub-model would cut: refused, not whole
            from sortednet.views import is_sharded
            out["read_at_rest_full"] = is_sharded(case.model.fc1.weight)
            try:
                with nest.use(nest.smallest):
                    case.model.fc1.weight  # noqa: B018
                out["read_at_rest_small"] = "accepted"
            except sn.SortedNetError as e:
                out["read_at_rest_small"] = str(e)
            # torch.distributed's bookkeeping walks the names with getattr: whole tensors inside use(small) too
            from torch.distributed.checkpoint.state_dict import get_model_state_dict
            outside = get_model_state_dict(case.model)
            with nest.use(nest.smallest):
                inside = get_model_state_dict(case.model)
                snd.save(nest, os.path.join(out_dir, f"inside-use-{rank}.safetensors"))
            out["dcp_inside_use"] = sorted(inside) == sorted(outside) and all(
                inside[k].shape == outside[k].shape for k in outside)
        try:
            nest.export(nest.smallest)
        except sn.SortedNetError as e:
            out["export_sharded"] = str(e)
        try:
            nest.check(case.example)
        except sn.SortedNetError as e:
            out["check_sharded"] = str(e)
        try:  # sorting permutes weights in place: sharded ones cannot be, refused up front (not a deepcopy error)
            sort_units(nest, "l1", example=case.example)
        except sn.SortedNetError as e:
            out.setdefault("sort_sharded", []).append(str(e))
        try:  # sn.save of a sharded model: refused before writing, pointing to snd.save
            sn.save(nest, os.path.join(out_dir, f"sharded-{rank}.safetensors"))
            out.setdefault("save_sharded", []).append("accepted")
        except sn.SortedNetError as e:
            out.setdefault("save_sharded", []).append(str(e))
    out["costs_sharded"] = costs
    case = FAMILIES["mlp"](seed=0)
    fully_shard(case.model, mesh=init_device_mesh("cpu", (WORLD,)))
    try:
        sn.wrap(case.model, *case.dims)
    except sn.SortedNetError as e:
        out["wrap_after_fully_shard"] = str(e)
    case = FAMILIES["mlp"](seed=0)  # left unsharded after a forward: plain tensors, an FSDP2 unit all the same
    fully_shard(case.model, mesh=init_device_mesh("cpu", (WORLD,)), reshard_after_forward=False)
    with torch.no_grad():
        case.model(case.example)
    try:
        sn.wrap(case.model, *case.dims)
    except sn.SortedNetError as e:
        out["wrap_after_unsharded_fully_shard"] = str(e)
    # tensor parallelism after wrap: its DTensor parameters stay sharded inside the forward, where a slice of
    # the local shard is not the sub-model's: refused by name (was: the whole tensor, the full-size layers run
    # under the smallest sub-model in silence, 0.68 off); the full model runs as before
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module
    case = FAMILIES["mlp"](seed=0)
    nest = sn.wrap(case.model, *case.dims)
    with torch.no_grad():
        want = case.model(case.example)
    parallelize_module(case.model, init_device_mesh("cpu", (WORLD,)),
                       {"fc1": ColwiseParallel(), "fc2": RowwiseParallel()})
    with torch.no_grad():
        got = case.model(case.example)
        out["tp_full"] = ((got.full_tensor() if hasattr(got, "full_tensor") else got) - want).abs().max().item()
        try:
            with nest.use(nest.smallest):
                case.model(case.example)
            out["tp_small"] = "accepted"
        except sn.SortedNetError as e:
            out["tp_small"] = str(e)
    # sn.wrap after DDP: adapters DDP never broadcast, each rank's own random init (the replicas drifted apart in
    # silence); and sn.wrap of the wrapper itself ('module.' patterns and checkpoint keys, an export of DDP)
    for same, seed in ((False, rank), (True, 0)):  # (each rank its own adapters: refused; the same: trained alike)
        case = FAMILIES["mlp"](seed=0)
        ddp = DDP(case.model)
        torch.manual_seed(seed)
        nest = sn.wrap(case.model, sn.Rank("r", [2, 4], targets="fc1", mode="lora"))
        opt = torch.optim.SGD(nest.trainable_parameters(), lr=0.1)
        try:
            for _ in range(2):
                snd.accumulate(nest, nest.submodels, lambda: _loss(ddp(case.example[rank::2])), module=ddp)  # noqa: B023
                opt.step()
                opt.zero_grad()
            every: list = [None] * WORLD
            dist.all_gather_object(every, case.model.fc1.lora_A.detach().clone())
            out[f"wrap_after_ddp_{same}"] = every
        except sn.SortedNetError as e:
            out[f"wrap_after_ddp_{same}"] = str(e)
    # the same through DDP's own reducer (a plain loop): it averages only the parameters it was built with, so
    # the adapters trained apart on each rank even from one seed (0.075 apart after 3 steps); refused at the forward
    case = FAMILIES["mlp"](seed=0)
    ddp = DDP(case.model)
    torch.manual_seed(0)
    nest = sn.wrap(case.model, sn.Rank("r", [2, 4], targets="fc1", mode="lora"))
    try:
        sn.accumulate(nest, nest.submodels, lambda: _loss(ddp(case.example[rank::2])))
        out["reducer_after_ddp"] = "accepted"
    except sn.SortedNetError as e:
        out["reducer_after_ddp"] = str(e)
    with ddp.no_sync():  # (gradients kept local: nothing to leave out of an average)
        sn.accumulate(nest, nest.submodels, lambda: _loss(ddp(case.example[rank::2])))
    case = FAMILIES["mlp"](seed=0)  # (a parameter of the user's own added after DDP(...): DDP's business, not
    ddp = DDP(case.model)           # sortednet's: a Width adds none; refused as "added by sn.wrap" before)
    case.model.extra = torch.nn.Parameter(torch.zeros(()))
    nest = sn.wrap(case.model, *case.dims)
    try:
        sn.accumulate(nest, nest.submodels, lambda: _loss(ddp(case.example[rank::2])))
        out["user_param_after_ddp"] = "accepted"
    except sn.SortedNetError as e:
        out["user_param_after_ddp"] = str(e)
    case = FAMILIES["mlp"](seed=0)  # (parameters DDP averages apart, built after wrap: not late)
    nest = sn.wrap(case.model, *case.dims)
    ddp = DDP(case.model, delay_all_reduce_named_params=[("fc2.weight", case.model.fc2.weight)],
              param_to_hook_all_reduce=case.model.fc1.weight)
    sn.accumulate(nest, nest.submodels, lambda: _loss(ddp(case.example[rank::2])))
    try:
        sn.wrap(DDP(FAMILIES["mlp"](seed=0).model), *FAMILIES["mlp"](seed=0).dims)
        out["wrap_of_ddp"] = "accepted"
    except sn.SortedNetError as e:
        out["wrap_of_ddp"] = str(e)
    case, nest = _build("mlp", "ddp")
    ddp = snd.guard(DDP(case.model, find_unused_parameters=True), nest)
    try:  # plain sn.accumulate through DDP's reducer: unchecked agreement of the ranks, skipped blocks awaited
        sn.accumulate(nest, [nest.smallest], lambda: _loss(ddp(case.example)))
    except sn.SortedNetError as e:
        out["ddp_reducer_guard"] = str(e)
    with ddp.no_sync(), nest.use(nest.smallest):
        ddp(case.example)  # allowed under no_sync
    # sync_gradients: a gradient on one rank only, on no rank, on both, bucketed one parameter at a time
    lin = torch.nn.Linear(3, 2)
    lin.weight.grad = torch.full((2, 3), float(rank + 1)) if rank == 0 else None
    lin.bias.grad = None
    calls = snd.sync_gradients(lin, bucket_bytes=1)
    lin2 = torch.nn.Linear(3, 2)
    lin2.weight.grad, lin2.bias.grad = torch.full((2, 3), float(rank + 1)), torch.full((2,), 10.0 * rank)
    snd.sync_gradients(lin2)
    out["sync"] = {"calls": calls, "one_rank": lin.weight.grad, "no_rank": lin.bias.grad,
                   "both": (lin2.weight.grad, lin2.bias.grad)}
    every: list = [None] * WORLD
    dist.all_gather_object(every, out["sync"])
    out["sync_all_ranks"] = every
    # a non-finite loss on ONE rank: every rank skips that sub-model (one decision, matched collectives)
    case, nest = _build("mlp", "ddp")
    ddp = DDP(case.model)

    def closure():
        loss = _loss(ddp(case.example))
        return loss * float("nan") if rank == 0 and nest.active == nest.smallest else loss

    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = snd.accumulate(nest, [nest.smallest, nest.largest], closure, module=ddp, nonfinite="skip")
    skipped: list = [None] * WORLD
    dist.all_gather_object(skipped, [str(s) for s in got.skipped])
    out["nonfinite_skipped"] = skipped
    out["grad_after_skip"] = case.model.fc1.weight.grad.clone()
    # FSDP2 with only the root sharded: a skipped LAST sub-model (a forward without backward) must not leave
    # the unit unsharded (the optimizer steps the shards), and an eval forward between steps is fine
    from sortednet.views import is_sharded
    case = FAMILIES["mlp"](seed=0)
    nest = sn.wrap(case.model, *case.dims)
    fully_shard(case.model, mesh=init_device_mesh("cpu", (WORLD,)))
    opt = torch.optim.SGD(nest.trainable_parameters(), lr=0.1)

    def nan_last():
        loss = _loss(case.model(case.example))
        return loss * float("nan") if rank == 0 and nest.active == nest.largest else loss

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        snd.accumulate(nest, [nest.smallest, nest.largest], nan_last, module=case.model, nonfinite="skip")
    out["fsdp_resharded_after_skip"] = all(is_sharded(p) for p in case.model.parameters())
    opt.step()
    opt.zero_grad()
    with torch.no_grad():
        case.model(case.example)
    try:
        snd.accumulate(nest, [nest.smallest], lambda: _loss(case.model(case.example)), module=case.model)
        out["fsdp_after_eval_forward"] = "ok"
    except sn.SortedNetError as e:
        out["fsdp_after_eval_forward"] = str(e)
    with torch.no_grad():  # an evaluation between accumulate and the step: the root unit keeps the values from
        case.model(case.example)  # before the step, which the next step's forwards reused
    opt.step()
    opt.zero_grad()
    got = snd.accumulate(nest, [nest.largest], lambda: _loss(case.model(case.example)), module=case.model)
    opt.zero_grad()
    case.model.reshard()
    with torch.no_grad(), nest.use(nest.largest):
        out["fsdp_eval_before_step"] = (got[0], float(_loss(case.model(case.example))))
    # ranks that drew other sub-models (a seed per rank), or another number of them: refused on every rank
    case, nest = _build("mlp", "ddp")
    ddp = DDP(case.model)
    for key, subs in (("other_order", [nest.smallest, nest.largest][::1 if rank == 0 else -1]),
                      ("other_k", [nest.smallest, nest.largest][:2 - rank])):
        try:
            snd.accumulate(nest, subs, lambda: _loss(ddp(case.example)), module=ddp)
            out[key] = "accepted"
        except sn.SortedNetError as e:
            out[key] = str(e)
    case, nest = _build("mlp", "ddp")
    ddp = DDP(case.model)
    try:  # module= left out while the closure calls the DDP wrapper
        snd.accumulate(nest, [nest.smallest, nest.largest], lambda: _loss(ddp(case.example)))
        out["module_left_out"] = "accepted"
    except sn.SortedNetError as e:
        out["module_left_out"] = str(e)
    case, nest = _build("mlp", "ddp")
    ddp = DDP(case.model)
    try:  # module= naming the model inside the wrapper the closure calls: DDP's raw reducer error at step 0
        snd.accumulate(nest, [nest.smallest, nest.largest], lambda: _loss(ddp(case.example)), module=case.model)
        out["module_inner"] = "accepted"
    except sn.SortedNetError as e:
        out["module_inner"] = str(e)
    # a closure that switches sub-models on one rank only: refused on every rank before the forward runs
    # (DDP: the gradients of different sub-models would be averaged; FSDP2: the all-gathers would hang)
    for how in ("ddp", "fsdp2", "ddp_compiled"):  # (compiled: the hooks of the modules Dynamo traced never ran)
        case, nest = _build("lm_width_heads_depth", "fsdp2" if how == "fsdp2" else "ddp")
        module = (DDP(case.model) if how == "ddp" else torch.compile(DDP(case.model), backend="eager")
                  if how == "ddp_compiled" else fully_shard(case.model, mesh=init_device_mesh("cpu", (WORLD,))))

        def switching(module=module, nest=nest):
            with nest.use(nest.smallest) if rank == 1 else nullcontext():
                return _loss(module(case.example))  # noqa: B023

        try:
            snd.accumulate(nest, [nest.largest], switching, module=module)
            out[f"closure_use_{how}"] = "accepted"
        except sn.SortedNetError as e:
            out[f"closure_use_{how}"] = str(e)
    # sn.accumulate through a DDP wrapper with a Sampler seeded per rank: DDP averaged two sub-models' gradients
    case, nest = _build("mlp", "ddp")
    ddp = DDP(case.model)
    try:  # (what two Samplers with other seeds draw)
        sn.accumulate(nest, [nest.largest if rank == 0 else nest.smallest], lambda: _loss(ddp(case.example)))
        out["sn_accumulate_other_subs"] = "accepted"
    except sn.SortedNetError as e:
        out["sn_accumulate_other_subs"] = (str(e), all(p.grad is None for p in case.model.parameters()))
    # a task head outside the nest's model and outside module=: its gradient was each rank's own (drift)
    case, nest = _build("mlp", "ddp")
    head = torch.nn.Linear(case.model(case.example).shape[-1], 2)
    outer = torch.nn.Sequential(case.model, head)
    teacher = copy.deepcopy(head)  # a gradient reaches it, but no optimizer steps it: harmless, accepted
    snd.accumulate(nest, [nest.smallest, nest.largest], lambda: _loss(teacher(case.model(case.example))))
    out["unstepped_teacher_outside"] = teacher.weight.grad is not None
    outer_opt = torch.optim.SGD(outer.parameters(), lr=0.1)
    case.model.zero_grad(set_to_none=True)
    try:
        snd.accumulate(nest, [nest.smallest, nest.largest], lambda: _loss(outer(case.example)))
        out["head_outside"] = "accepted"
    except sn.SortedNetError as e:
        out["head_outside"] = (str(e), all(p.grad is None for p in outer.parameters()))
    head.requires_grad_(False)  # a frozen head: nothing to average, accepted
    snd.accumulate(nest, [nest.smallest, nest.largest], lambda: _loss(outer(case.example)))
    out["frozen_head_outside"] = case.model.fc1.weight.grad is not None
    del outer_opt
    # sn.accumulate through DDP with uneven inputs under Join: rank 1 runs one step fewer (the agreement check
    # stands aside under Join, whose joined ranks shadow DDP's own collectives only: it hung)
    from torch.distributed.algorithms.join import Join
    case, nest = _build("mlp", "ddp")
    ddp = DDP(case.model, find_unused_parameters=True)
    with Join([ddp]):
        for _ in range(3 - rank):
            sn.accumulate(nest, [nest.largest], lambda: _loss(ddp(case.example)))
    out["join_uneven"] = "finished"
    # parameters outside the nest inside the DDP wrapper (a task head) are averaged with the nest's
    case, nest = _build("mlp", "ddp")
    head = torch.nn.Linear(case.model(case.example).shape[-1], 2)
    torch.manual_seed(5)
    torch.nn.init.normal_(head.weight)
    outer = DDP(torch.nn.Sequential(case.model, head))
    x = _batch("mlp", 0).chunk(WORLD)[rank]
    snd.accumulate(nest, [nest.smallest, nest.largest], lambda: _loss(outer(x)), module=outer)
    every = [None] * WORLD
    dist.all_gather_object(every, (head.weight.grad.clone(), case.model.fc1.weight.grad.clone()))
    out["outer_head_grads"] = every
    case, nest = _build("mlp", "ddp")
    try:
        snd.accumulate(nest, [nest.largest], lambda: _loss(case.model(case.example)),
                       module=DDP(case.model, static_graph=True))
    except sn.SortedNetError as e:
        out["static_graph"] = str(e)
    emb = torch.nn.Sequential(torch.nn.Embedding(10, 8, sparse=True), torch.nn.Linear(8, 8), torch.nn.Linear(8, 2))
    enest = sn.wrap(emb, sn.Width("h", [4, 8], out="1", inp="2"))
    tokens = torch.tensor([[1, 2, 3]])
    try:  # a sparse gradient could not be flattened into the all_reduce: a raw "reshape ... sparse" before
        snd.accumulate(enest, [enest.largest], lambda: emb(tokens).sum())
    except sn.SortedNetError as e:
        out["sparse_accumulate"] = (str(e), emb[0].weight.grad is None)
    emb(tokens).sum().backward()
    try:
        snd.sync_gradients(emb)
    except sn.SortedNetError as e:
        out["sparse_sync"] = str(e)
    # sn.accumulate (not snd's) through a DDP wrapper, at a depth below full
    case, nest = _build("lm_width_heads_depth", "ddp")
    plain_ddp = DDP(case.model)
    shallow = nest.smallest
    try:
        sn.accumulate(nest, [shallow], lambda: plain_ddp(case.example).float().square().mean())
    except sn.SortedNetError as e:
        out["sn_accumulate_ddp"] = (str(e), all(p.grad is None for p in case.model.parameters()))
    # ... with the ranks at different depths, one full: the shallow rank refused alone (before the check the ranks
    # run together) and left the other waiting in that check until the process group's timeout
    t0 = time.perf_counter()
    try:
        sn.accumulate(nest, [nest.largest if rank == 0 else shallow],
                      lambda: plain_ddp(case.example).float().square().mean())
    except (sn.SortedNetError, RuntimeError) as e:
        out["sn_accumulate_ddp_depths"] = (type(e).__name__, str(e), time.perf_counter() - t0 < 30)
    try:
        sn.fit(nest, [(case.example, torch.zeros(len(case.example), dtype=torch.long))],
               torch.optim.SGD(case.model.parameters(), lr=0.1), sn.Sampler(nest, k=1))
    except sn.SortedNetError as e:
        out["fit_multi_rank"] = str(e)
    out.update(_one_rank_faults(rank, out_dir))
    out.update(_sharding_and_ignores(rank, out_dir))
    return out


class _TiedLM(torch.nn.Module):
    """An embedding and an output layer holding one tensor, a nested hidden width between."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb, self.fc1, self.fc2 = torch.nn.Embedding(20, 8), torch.nn.Linear(8, 16), torch.nn.Linear(16, 8)
        self.head = torch.nn.Linear(8, 20, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, tokens):
        return self.head(self.fc2(torch.relu(self.fc1(self.emb(tokens)))))


def _tied_nest(model):
    return sn.wrap(model, sn.Width("h", [4, 16], out="fc1", inp="fc2"))


def _sharding_and_ignores(rank: int, out_dir: str) -> dict:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    out: dict = {}
    # DDP told to leave parameters alone (rank-local weights): accumulate averaged them anyway
    case, nest = _build("mlp", "ddp")
    DDP._set_params_and_buffers_to_ignore_for_model(case.model, ["fc3.weight", "fc3.bias"])
    ddp = DDP(case.model)
    x = _batch("mlp", 0).chunk(WORLD)[rank]
    snd.accumulate(nest, [nest.smallest, nest.largest], lambda: _loss(ddp(x)), module=ddp)
    every: list = [None] * WORLD
    dist.all_gather_object(every, (case.model.fc3.weight.grad.clone(), case.model.fc1.weight.grad.clone()))
    out["ignored_grads"] = every
    # sn.accumulate through DDP(find_unused_parameters=False) at a depth whose skipped blocks DDP ignores: DDP
    # waits for none of them, so the reducer check must not refuse it
    case, nest = _build("lm_width_heads_depth", "ddp_unused")
    depth = next(d for d in nest.dims if d.kind == "depth")
    shallow = next(sub for sub in reversed(nest.submodels) if sub[depth.name] == min(depth.sizes))
    skipped = [n for n, _ in case.model.named_parameters()
               if any(n.startswith(f"blocks.{i}.") for i in range(min(depth.sizes), max(depth.sizes)))]
    DDP._set_params_and_buffers_to_ignore_for_model(case.model, skipped)
    ddp = DDP(case.model, find_unused_parameters=False)
    try:
        for _ in range(2):
            sn.accumulate(nest, [shallow], lambda: _loss(ddp(case.example)))  # noqa: B023
        out["ignored_skipped_blocks"] = "ok"
    except sn.SortedNetError as e:
        out["ignored_skipped_blocks"] = str(e)
    # a tied weight under FSDP2: snd.save gathered it once per name into two tensors, a file sn.load refused
    model = _TiedLM()
    nest = _tied_nest(model)
    mesh = init_device_mesh("cpu", (WORLD,))
    fully_shard(model, mesh=mesh)
    tokens = torch.tensor([[1, 2, 3], [4, 5, 6]])
    snd.accumulate(nest, [nest.smallest, nest.largest], lambda: model(tokens).square().mean(), module=model)
    torch.optim.SGD(model.parameters(), lr=0.5).step()
    snd.save(nest, os.path.join(out_dir, "tied-fsdp2.safetensors"))
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    out["tied_state"] = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    try:  # sn.load into the sharded model: a raw "invalid python storage" error before
        sn.load(nest, os.path.join(out_dir, "tied-fsdp2.safetensors"))
        out["load_into_sharded"] = "accepted"
    except sn.SortedNetError as e:
        out["load_into_sharded"] = str(e)
    # the blocks sharded, the root not: the root's gradients stayed each rank's own (the replicas drifted apart)
    case, nest = _build("lm_width_heads_depth", "fsdp2_blocks")
    for blocks in [m for m in case.model.modules() if isinstance(m, torch.nn.ModuleList)]:
        for blk in blocks:
            fully_shard(blk, mesh=mesh)
    before = [p.detach().clone() for p in _build("lm_width_heads_depth", "fsdp2_blocks")[0].model.parameters()]
    try:
        snd.accumulate(nest, [nest.largest], lambda: _loss(case.model(case.example)), module=case.model)
        out["root_unsharded"] = "accepted"
    except sn.SortedNetError as e:
        out["root_unsharded"] = (str(e), all(torch.equal(p.full_tensor() if hasattr(p, "full_tensor") else p, q)
                                             for p, q in zip(case.model.parameters(), before)))
    # a tie across two units: fully_shard gives each its own tensor; said as that, not as the user's change
    torch.manual_seed(0)
    split = torch.nn.Sequential(*(torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 8))
                                  for _ in range(2)))
    split[1][2].weight = split[0][2].weight
    nest = sn.wrap(split, sn.Width("h", [8, 16], out=["0.0", "1.0"], inp=["0.2", "1.2"]))
    for blk in split:
        fully_shard(blk, mesh=mesh)
    fully_shard(split, mesh=mesh)
    try:
        snd.accumulate(nest, [nest.largest], lambda: split(torch.randn(2, 8)).square().mean(), module=split)
        out["tie_split"] = "accepted"
    except sn.SortedNetError as e:
        out["tie_split"] = str(e)
    case = FAMILIES["mlp"](seed=0)
    nest = sn.wrap(case.model, *case.dims)
    fully_shard(case.model, mesh=mesh)
    for key, call in (("compile_sharded", nest.compile), ("profile_sharded", lambda: nest.profile(case.example))):
        try:  # (they said "Tensor parallelism is not supported" / "deepcopy failed")
            call()
            out[key] = "accepted"
        except sn.SortedNetError as e:
            out[key] = str(e)
    # a layer in no unit that only rank 0's data reaches: judged from FSDP2's records, so both ranks refuse (judged
    # from the gradients, rank 0 alone raised and rank 1 went on to its next collective)
    class Routed(torch.nn.Module):
        def __init__(self, body):
            super().__init__()
            self.body, self.extra = body, torch.nn.Linear(5, 5)

        def forward(self, x):
            y = self.body(x)
            return self.extra(y) if rank == 0 else y

    case, nest = _build("mlp", "fsdp2")
    routed = Routed(case.model)
    fully_shard(case.model, mesh=mesh)
    try:
        snd.accumulate(nest, [nest.largest], lambda: _loss(routed(case.example)), module=routed)
        out["routed_unsharded"] = "accepted"
    except sn.SortedNetError as e:
        out["routed_unsharded"] = str(e)
    every = [None] * WORLD
    dist.all_gather_object(every, out["routed_unsharded"])
    out["routed_unsharded"] = every
    # the nest's backbone with its blocks sharded inside a task model whose root unit is sharded too: accepted
    # (the root unit covers the backbone's own parameters; module= the backbone or nothing)
    case, nest = _build("lm_width_heads_depth", "fsdp2_blocks")
    outer = torch.nn.Sequential(case.model)
    for blocks in [m for m in case.model.modules() if isinstance(m, torch.nn.ModuleList)]:
        for blk in blocks:
            fully_shard(blk, mesh=mesh)
    fully_shard(outer, mesh=mesh)
    try:
        for module in (None, case.model):
            snd.accumulate(nest, [nest.largest], lambda: _loss(outer(case.example)), module=module)
        out["outer_root_sharded"] = "ok"
    except sn.SortedNetError as e:
        out["outer_root_sharded"] = str(e)
    # FSDP1 (FullyShardedDataParallel) flattens parameters: refused by name, before or after wrap
    from torch.distributed.fsdp import FullyShardedDataParallel
    case = FAMILIES["mlp"](seed=0)
    FullyShardedDataParallel(case.model, device_id=torch.device("cpu"), use_orig_params=True)
    try:
        sn.wrap(case.model, *case.dims)
        out["fsdp1_then_wrap"] = "accepted"
    except sn.SortedNetError as e:
        out["fsdp1_then_wrap"] = str(e)
    case = FAMILIES["mlp"](seed=0)
    sn.wrap(case.model, *case.dims)
    try:
        FullyShardedDataParallel(case.model, device_id=torch.device("cpu"))
        out["wrap_then_fsdp1"] = "accepted"
    except sn.SortedNetError as e:
        out["wrap_then_fsdp1"] = str(e)
    return out


def _one_rank_faults(rank: int, out_dir: str) -> dict:
    """A fault on ONE rank raises on EVERY rank (each rank's error gathered: a rank left waiting would hang
    the run). Rank 1 is at fault unless said otherwise."""
    out: dict = {}

    def every_rank(key, fn):
        try:
            fn()
            mine = "accepted"
        except Exception as e:  # noqa: BLE001  (recorded by type and text)
            mine = f"{type(e).__name__}: {e}"
        got: list = [None] * WORLD
        dist.all_gather_object(got, mine)
        out[key] = got

    case, nest = _build("mlp", "ddp")
    ddp = DDP(case.model)
    two = [nest.smallest, nest.largest]
    step = lambda closure=None, **kw: snd.accumulate(  # noqa: E731
        nest, two, closure or (lambda: _loss(ddp(case.example))), module=ddp, **kw)
    every_rank("bad_weights_one_rank", lambda: step(weights=[1.0] if rank == 1 else [0.5, 0.5]))
    every_rank("other_weights", lambda: step(weights=[0.3, 0.7] if rank == 1 else [0.5, 0.5]))
    every_rank("bad_nonfinite_one_rank", lambda: step(nonfinite="drop" if rank == 1 else "raise"))

    def detached():  # refused by accumulate after the forward, on rank 1 only
        loss = _loss(ddp(case.example))
        return loss.detach() if rank == 1 else loss

    every_rank("refused_loss_one_rank", lambda: step(detached))

    def early():  # raises before its forward on rank 1: the other rank is at its forward's check by then
        if rank == 1 and nest.active == nest.largest:
            raise ValueError("no batch")
        return _loss(ddp(case.example))

    every_rank("closure_raises_one_rank", lambda: step(early))
    every_rank("ranks_still_in_step", lambda: step())  # the ranks are matched again afterwards
    # ranks that ran different numbers of steps (uneven data): rank 1 saves while rank 0 starts another step
    every_rank("save_while_a_rank_steps", lambda: snd.save(nest, os.path.join(out_dir, "uneven.safetensors"))
               if rank == 1 else step())
    every_rank("ranks_still_in_step_after_save", lambda: step())
    every_rank("save_missing_folder", lambda: snd.save(nest, os.path.join(out_dir, f"missing-{rank}",
                                                                           "nest.safetensors")))
    every_rank("calibrate_multi_rank", lambda: _bn_nest()[1].calibrate([torch.randn(4, 1, 6, 6)], batches=1))
    own = _batch("mlp", 100 + rank)  # each rank's own data: Taylor scores (and orders) would differ per replica
    every_rank("sort_taylor_multi_rank", lambda: sort_units(nest, "taylor", example=own, data=[own],
                                                            loss_fn=lambda m, b: _loss(m(b))))
    every_rank("sort_l1_multi_rank", lambda: sort_units(nest, "l1", example=own))  # weights alone: alike
    state = [p.detach().clone() for p in case.model.parameters()]
    got: list = [None] * WORLD
    dist.all_gather_object(got, state)
    out["sorted_replicas_equal"] = all(torch.equal(a, b) for a, b in zip(got[0], got[1]))
    # replicas built apart (a seed per rank; no DDP broadcast in plain processes), or trained on different nests
    # under the same sub-model names, or with a parameter frozen on one rank only: refused on every rank
    seeded = FAMILIES["mlp"](seed=rank)
    seeded_nest = sn.wrap(seeded.model, *seeded.dims)
    every_rank("seed_per_rank_plain", lambda: snd.accumulate(
        seeded_nest, [seeded_nest.largest], lambda: _loss(seeded.model(seeded.example))))
    out["seed_per_rank_grads"] = all(p.grad is None for p in seeded.model.parameters())
    # alike at the first step, then a checkpoint loaded on one rank only (a best model restored on rank 0): the
    # replicas were compared at the first step alone, and drifted apart in silence
    alike = FAMILIES["mlp"](seed=0)
    alike_nest = sn.wrap(alike.model, *alike.dims)
    first = {k: v.clone() for k, v in alike.model.state_dict().items()}
    def alike_step():
        snd.accumulate(alike_nest, [alike_nest.largest], lambda: _loss(alike.model(alike.example)))
        alike.model.zero_grad(set_to_none=True)

    every_rank("alike_first_step", alike_step)
    if rank == 1:
        alike.model.load_state_dict({k: v + 0.01 for k, v in first.items()})
    every_rank("loaded_on_one_rank", alike_step)
    alike.model.load_state_dict(first)  # every rank: alike again, accepted
    every_rank("loaded_on_every_rank", alike_step)
    # a checkpoint that differs in one value the sampled digest passes over (a few rows of an embedding)
    wide = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 3))
    wide_nest = sn.wrap(wide, sn.Width("w", [32, 64], out="0", inp="2"))
    def wide_step():
        snd.accumulate(wide_nest, [wide_nest.largest], lambda: _loss(wide(torch.ones(2, 64))))
        wide.zero_grad(set_to_none=True)

    every_rank("wide_first_step", wide_step)
    if rank == 1:
        with torch.no_grad():
            changed = {k: v.clone() for k, v in wide.state_dict().items()}
            changed["0.weight"].view(-1)[1] += 1.0  # (the sample reads every 4th value)
        wide.load_state_dict(changed)
    every_rank("loaded_one_value_on_one_rank", wide_step)
    # units sorted on one rank only (a weight-norm sort runs under a process group): the replicas were not
    # compared again and trained on in another order each; two values swapped where the sample does not read (a
    # plain sum of the bits is the same)
    for key in ("sorted_on_one_rank", "swapped_on_one_rank"):
        torch.manual_seed(0)
        alone = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 3))
        alone_nest = sn.wrap(alone, sn.Width("w", [32, 64], out="0", inp="2"))

        def alone_step(alone=alone, alone_nest=alone_nest):
            snd.accumulate(alone_nest, [alone_nest.largest], lambda: _loss(alone(torch.ones(2, 64))))
            alone.zero_grad(set_to_none=True)

        every_rank(f"{key}_first", alone_step)
        if rank == 1 and key == "sorted_on_one_rank":
            sort_units(alone_nest, "l1", example=torch.ones(2, 64))
        elif rank == 1:
            swapped = {k: v.clone() for k, v in alone.state_dict().items()}
            flat = swapped["0.weight"].view(-1)
            flat[1], flat[2] = flat[2].clone(), flat[1].clone()  # (the sample reads every 4th value)
            alone.load_state_dict(swapped)
        every_rank(key, alone_step)
    # a task head the DDP wrapper holds beside the wrapped backbone, restored on one rank only
    torch.manual_seed(0)
    backbone = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.ReLU(), torch.nn.Linear(16, 16))
    task_head = torch.nn.Linear(16, 3)
    back_nest = sn.wrap(backbone, sn.Width("h", [8, 16], out="0", inp="2"))
    outer = DDP(torch.nn.Sequential(backbone, torch.nn.ReLU(), task_head))
    def outer_step():
        snd.accumulate(back_nest, [back_nest.largest], lambda: _loss(outer(torch.ones(2, 6))), module=outer)
        outer.zero_grad(set_to_none=True)

    every_rank("outer_first_step", outer_step)
    head_before = {k: v.clone() for k, v in task_head.state_dict().items()}
    if rank == 0:
        task_head.load_state_dict({k: v + 0.5 for k, v in task_head.state_dict().items()})
    every_rank("head_loaded_on_one_rank", outer_step)
    every_rank("head_loaded_on_one_rank_again", outer_step)  # (a retry is compared again, not taken)
    # a head added to module= after its first step, then restored on one rank; a frozen parameter loaded on one
    outer.module.append(torch.nn.Linear(3, 3))  # rank (a LoRA base: another model, though nothing of it trains)
    if rank == 0:
        task_head.load_state_dict(head_before)
    every_rank("outer_alike_again", outer_step)
    late_before = {k: v.clone() for k, v in outer.module[3].state_dict().items()}
    if rank == 1:
        outer.module[3].load_state_dict({k: v + 0.5 for k, v in late_before.items()})
    every_rank("late_head_loaded_on_one_rank", outer_step)
    if rank == 1:
        outer.module[3].load_state_dict(late_before)
    backbone[0].bias.requires_grad_(False)
    every_rank("outer_frozen_alike", outer_step)
    if rank == 1:
        backbone[0].load_state_dict({"weight": backbone[0].weight, "bias": backbone[0].bias + 1})
    every_rank("frozen_loaded_on_one_rank", outer_step)
    layers = torch.nn.Sequential(*[torch.nn.Linear(6, 6) for _ in range(4)])
    torch.manual_seed(0)
    for p in layers.parameters():
        torch.nn.init.normal_(p)
    pair = ("0", "1") if rank == 0 else ("2", "3")  # the same dimension name and sizes, other layers
    other = sn.wrap(layers, sn.Width("w", [3, 6], out=pair[0], inp=pair[1]))
    every_rank("other_nest_same_names", lambda: snd.accumulate(other, [other.largest],
                                                               lambda: _loss(layers(torch.ones(2, 6)))))
    frozen = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Linear(2, 2))
    frozen[rank].bias.requires_grad_(False)  # (the same count of values, other parameters: buckets shifted)
    for p in frozen.parameters():
        p.grad = torch.ones_like(p)
    every_rank("frozen_other_parameter", lambda: snd.sync_gradients(frozen))
    fewer = torch.nn.Linear(3, 2)
    if rank == 1:
        fewer.bias.requires_grad_(False)  # (fewer values on one rank: gloo aborted the process)
    fewer.weight.grad = torch.ones(2, 3)
    every_rank("frozen_on_one_rank", lambda: snd.sync_gradients(fewer))
    half = torch.nn.Linear(2, 2).half()  # summed before dividing, two fp16 gradients of 40,000 overflowed
    half.weight.grad = torch.full((2, 2), 40000.0, dtype=torch.float16)
    snd.sync_gradients(half)
    out["fp16_sync"] = half.weight.grad.float()
    # FSDP2 with a task head the closure trains outside module=: no unit reduces its gradients
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    sharded = FAMILIES["mlp"](seed=0)
    sharded_nest = sn.wrap(sharded.model, *sharded.dims)
    head = torch.nn.Linear(sharded.model.fc3.out_features, 2)
    fully_shard(sharded.model, mesh=init_device_mesh("cpu", (WORLD,)))
    stepper = torch.optim.SGD([*sharded_nest.trainable_parameters(), *head.parameters()], lr=0.1)
    every_rank("fsdp2_head_outside", lambda: snd.accumulate(
        sharded_nest, [sharded_nest.largest], lambda: _loss(head(sharded.model(sharded.example))),
        module=sharded.model))
    out["fsdp2_head_grads"] = head.weight.grad is None
    # FSDP2: a load on one rank only (a best model restored on rank 0) leaves each rank's shard of another
    # checkpoint; the same load on every rank is taken
    shards = FAMILIES["mlp"](seed=0)
    shards_nest = sn.wrap(shards.model, *shards.dims)
    fully_shard(shards.model, mesh=init_device_mesh("cpu", (WORLD,)))
    def shards_step():
        snd.accumulate(shards_nest, [shards_nest.largest], lambda: _loss(shards.model(shards.example)),
                       module=shards.model)
        shards.model.zero_grad(set_to_none=True)

    every_rank("fsdp2_first_step", shards_step)
    saved = {k: v.detach().clone() for k, v in shards.model.state_dict().items()}
    shards.model.load_state_dict(saved)
    every_rank("fsdp2_loaded_on_every_rank", shards_step)
    if rank == 0:
        shards.model.load_state_dict(saved)
    every_rank("fsdp2_loaded_on_one_rank", shards_step)
    del stepper
    # DDP(process_group=one rank each): each rank is its own replica, nothing is averaged across ranks
    groups = [dist.new_group([r]) for r in range(WORLD)]
    case, nest = _build("mlp", "ddp")
    ref_case = FAMILIES["mlp"](seed=0)
    ref = ref_case.model
    x = _batch("mlp", rank).chunk(WORLD)[rank]
    alone = DDP(case.model, process_group=groups[rank])
    snd.accumulate(nest, [nest.smallest, nest.largest], lambda: _loss(alone(x)), module=alone)
    rnest = sn.wrap(ref, *ref_case.dims)
    sn.accumulate(rnest, [rnest.smallest, rnest.largest], lambda: _loss(ref(x)))
    out["own_group_grad_error"] = max(float((p.grad - q.grad).abs().max()) for p, q in
                                      zip(case.model.parameters(), ref.parameters()))
    return out


def _bn_nest():
    case = FAMILIES["cnn_bn_residual"](seed=0)
    return case, sn.wrap(case.model, *case.dims)


def _bn_buffers(rank: int, plain: bool = False) -> dict:
    """BatchNorm in training mode under DDP + sortednet's accumulation: every forward runs under no_sync, where
    DDP broadcasts no buffers; ``accumulate`` then copies the first rank's at the step's end, as DDP's
    pre-forward broadcast would (the ranks' statistics drifted apart, each from its own shards, in silence).
    ``plain``: plain processes (no DDP wrapper), the same rule (each rank kept its own statistics: eval outputs
    differed by rank, sn.save wrote rank 0's). Each rank's buffers after 3 steps, and rank 0's running
    statistics computed alone on its own shards."""
    case, nest = _bn_nest()
    model = case.model.train()
    ddp, opt, sampler = (model if plain else DDP(model)), _optimizer(nest.trainable_parameters()), _sampler(nest)
    alone_case, alone = _bn_nest()
    alone_case.model.train()
    for step in range(3):
        with torch.no_grad():  # rank 0's forwards of this step, with this step's weights, on its shard alone
            for p, q in zip(model.parameters(), alone_case.model.parameters()):
                q.copy_(p)
            for sub in sampler.draw(step):
                with alone.use(sub):
                    alone_case.model(_batch("cnn_bn_residual", step).chunk(WORLD)[0])
        x = _batch("cnn_bn_residual", step).chunk(WORLD)[rank]
        snd.accumulate(nest, sampler.draw(step), lambda: _loss(ddp(x)), module=None if plain else ddp)  # noqa: B023
        opt.step()
        opt.zero_grad(set_to_none=True)
    mine = {k: v.clone() for k, v in model.named_buffers()}
    every: list = [None] * WORLD
    dist.all_gather_object(every, mine)
    return {"ranks": every, "rank0_alone": {k: v.clone() for k, v in alone_case.model.named_buffers()}}


def _body_and_head():
    """A nested body and a task head no dimension slices (given to FSDP1 on the ranks), in float64."""
    torch.manual_seed(0)
    body = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.ReLU(), torch.nn.Linear(16, 8)).double()
    head = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)).double()
    return body, head, sn.wrap(body, sn.Width("h", [4, 8, 16], out="0", inp="2"))


def _head_batch(step: int):
    g = torch.Generator().manual_seed(100 + step)
    return torch.randn(8, 6, generator=g, dtype=torch.float64), torch.randint(0, 3, (8,), generator=g)


def _fsdp1_head_and_fsdp2_draws(rank: int) -> dict:
    """A head given to FSDP1 beside the nest, trained by snd.accumulate (its gradients were averaged a second
    time, one rank's shard added to another's; with use_orig_params the ranks' buffers differed in length and
    gloo aborted the process); sn.accumulate through an FSDP2 model with a sub-model drawn per rank."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp import fully_shard

    out: dict = {}
    for orig in (False, True, "ignored"):  # ("ignored": its last layer in ignored_modules=, left to the caller)
        body, head, nest = _body_and_head()
        head = FSDP(head, device_id=torch.device("cpu"), use_orig_params=bool(orig),
                    ignored_modules=[head[2]] if orig == "ignored" else None)
        both = torch.nn.Sequential(body, head)
        opt = torch.optim.SGD([*nest.trainable_parameters(), *head.parameters()], lr=0.1)
        sampler = sn.Sampler(nest.submodels, k=2, seed=0)
        for step in range(3):
            x, y = (t.chunk(WORLD)[rank] for t in _head_batch(step))
            snd.accumulate(nest, sampler.draw(step), lambda: F.cross_entropy(both(x), y), module=both)  # noqa: B023
            opt.step()
            opt.zero_grad()
        with FSDP.summon_full_params(head):
            out[f"fsdp1_head_{orig}"] = ({k: v.clone() for k, v in body.state_dict().items()},
                                         {k: v.detach().clone() for k, v in head.module.state_dict().items()})
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
    nest = sn.wrap(model, sn.Width("h", [4, 8, 16], out="0", inp="2"))
    fully_shard(model, mesh=init_device_mesh("cpu", (WORLD,)))
    x = torch.randn(4, 6)
    try:
        sn.accumulate(nest, [nest.submodels[rank + 1]], lambda: model(x).square().mean())
        out["fsdp2_other_draws"] = "ok"
    except sn.SortedNetError as e:
        out["fsdp2_other_draws"] = str(e)
    every: list = [None] * WORLD
    dist.all_gather_object(every, out)
    return every


def _fsdp2_loads(rank: int) -> dict:
    """Loads into an FSDP2-sharded Rank nest that sortednet refuses in one process, before any copy: FSDP2's own
    load hooks (resharding, on every module holding its parameters, a pre-hook from the first forward on) were
    taken for hooks that rename keys or drop missing ones, which switched the checks off; and
    set_model_state_dict fills the keys a state_dict lacks with the model's own tensors, which passed a pre-wrap
    svd weight. What each load raised, and the keys it changed, per case."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    def mlp(seed):
        torch.manual_seed(seed)
        return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))

    def nest_of(seed, ranks, mode):
        m = mlp(seed)
        sn.wrap(m, sn.Rank("r", ranks, targets="0", mode=mode))
        return m

    out: dict = {}
    cases = {"other_ranks_dcp": ("lora", lambda: nest_of(1, [2, 4], "lora").state_dict(), "dcp", True),
             "other_ranks_plain": ("svd", lambda: nest_of(1, [2, 4], "svd").state_dict(), "plain", True),
             "base_into_lora_strict": ("lora", lambda: mlp(1).state_dict(), "plain", True),
             "prewrap_svd_dcp_strict": ("svd", lambda: mlp(1).state_dict(), "dcp", True),
             "prewrap_svd_dcp_lenient": ("svd", lambda: mlp(1).state_dict(), "dcp", False)}
    for name, (mode, source, how, strict) in cases.items():
        model = nest_of(0, [2, 4, 8], mode)
        fully_shard(model, mesh=init_device_mesh("cpu", (WORLD,)))
        model(torch.randn(4, 8)).sum().backward()  # (a forward: FSDP2 registers its load pre-hooks there)
        model.zero_grad(set_to_none=True)
        before = {k: v.full_tensor().clone() for k, v in model.state_dict().items()}
        sd = source()
        try:
            if how == "dcp":
                set_model_state_dict(model, sd, options=StateDictOptions(full_state_dict=True, strict=strict))
            else:
                model.load_state_dict(sd, strict=strict)
            said = "accepted"
        except sn.SortedNetError as e:
            said = f"SortedNetError: {e}"
        except Exception as e:  # noqa: BLE001 - what the test reports
            said = f"{type(e).__name__}: {e}"
        changed = [k for k, v in model.state_dict().items() if not torch.equal(v.full_tensor(), before[k])]
        out[name] = (said, changed)
    return out


def _worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    slicers.INPLACE_MIN_NUMEL = 0
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=datetime.timedelta(seconds=60))
    try:
        results = {name: _train_rank(rank, fam, mode, os.path.join(out_dir, f"{name}.safetensors"))
                   for name, (fam, mode) in SCENARIOS.items()}
        results["errors"] = _errors(rank, out_dir)
        results["bn_buffers"] = _bn_buffers(rank)
        results["bn_buffers_plain"] = _bn_buffers(rank, plain=True)
        results["fsdp1_head"] = _fsdp1_head_and_fsdp2_draws(rank)
        results["fsdp2_loads"] = _fsdp2_loads(rank)
        if rank == 0:
            torch.save(results, os.path.join(out_dir, "results.pt"))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """The 2-rank run, once per test session (pytest-xdist workers share it through a locked directory)."""
    base = tmp_path_factory.getbasetemp()
    out = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "sortednet_distributed"
    out.mkdir(exist_ok=True)
    with open(out / "lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (out / "results.pt").exists():
            mp.spawn(_worker, args=(_free_port(), str(out)), nprocs=WORLD, join=True)
    return str(out), torch.load(out / "results.pt", weights_only=False)


def _reference(family: str, mode: str):
    """One process, the whole global batch, the same drawn sub-models."""
    old, slicers.INPLACE_MIN_NUMEL = slicers.INPLACE_MIN_NUMEL, 0
    try:
        case, nest = _build(family, mode)
        opt, sampler = _optimizer(nest.trainable_parameters()), _sampler(nest)
        for step in range(STEPS):
            x = _batch(family, step)
            sn.accumulate(nest, sampler.draw(step), lambda: _loss(case.model(x)))  # noqa: B023
            opt.step()
            opt.zero_grad(set_to_none=True)
    finally:
        slicers.INPLACE_MIN_NUMEL = old
    return case, nest, sampler


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_ranks_draw_the_same_submodels(run, name):
    _, results = run
    fam, mode = SCENARIOS[name]
    _, nest = _build(fam, mode)
    sampler = _sampler(nest)
    per_rank = results[name]["draws"]
    assert len(per_rank) == WORLD and all(len(d) == STEPS for d in per_rank)
    for step in range(STEPS):
        assert all(d[step] == per_rank[0][step] for d in per_rank), (step, [d[step] for d in per_rank])
        assert per_rank[0][step] == [str(s) for s in sampler.draw(step)]


def test_draws_exercise_blocks_skipped_by_the_last_backward():
    # the hard case for DDP's reducer: a block used by an earlier sub-model of the step, not by the last one
    _, nest = _build("lm_width_heads_depth", "ddp")
    draws = [_sampler(nest).draw(step) for step in range(STEPS)]
    assert any(d[-1]["depth"] < max(s["depth"] for s in d) for d in draws)


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_distributed_training_equals_one_process(run, name):
    _, results = run
    fam, mode = SCENARIOS[name]
    case, nest, _ = _reference(fam, mode)
    state = results[name]["state"]
    ref = case.model.state_dict()
    assert state.keys() == ref.keys()
    start = _build(fam, mode)[0].model.state_dict()
    for k, v in ref.items():
        torch.testing.assert_close(state[k], v, atol=1e-5, rtol=0, msg=lambda m, k=k: f"{name} {k}: {m}")
    ids = {id(p) for p in nest.trainable_parameters()}
    trained = [n for n, p in case.model.named_parameters() if id(p) in ids]
    moved = [n for n in trained if not torch.equal(ref[n], start[n])]
    assert len(moved) > len(trained) // 2, moved  # training really changed the weights


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_distributed_checkpoint_loads_in_one_process(run, name):
    out, results = run
    fam, mode = SCENARIOS[name]
    loaded = sn.load(FAMILIES[fam](seed=1).model, os.path.join(out, f"{name}.safetensors"))
    case, nest = _build(fam, mode)
    case.model.load_state_dict(results[name]["state"])
    assert loaded.submodels == nest.submodels
    with torch.no_grad():
        for sub in nest.submodels:
            with loaded.use(sub), nest.use(sub):
                assert torch.equal(loaded(case.example), nest(case.example)), sub


def test_misuse_raises_clear_errors(run):
    _, results = run
    errs = results["errors"]
    assert "wrap before fully_shard" in errs.get("wrap_after_fully_shard", "")
    assert "wrap before fully_shard" in errs.get("wrap_after_unsharded_fully_shard", "")
    assert errs["tp_full"] < 1e-5 and "fc1.weight is a DTensor" in errs["tp_small"]
    assert "Tensor parallelism" in errs["tp_small"]
    assert errs["read_at_rest_full"] and "fc1.weight is a DTensor" in errs["read_at_rest_small"]
    assert errs["dcp_inside_use"]
    assert "sortednet.distributed.accumulate" in errs.get("ddp_reducer_guard", "")
    msg = errs["wrap_after_ddp_False"]  # (rank 0's record: each rank its own adapters)
    assert "the parameters ['fc1.lora_A', 'fc1.lora_B'] differ between the ranks: the " \
        "DistributedDataParallel wrapper was built before they existed (added by sn.wrap" in msg, msg
    a, b = errs["wrap_after_ddp_True"]  # (the same adapters on every rank: accepted, trained alike)
    assert torch.equal(a, b)
    assert "'<root>' is a DistributedDataParallel wrapper: call sn.wrap on the model inside" in errs["wrap_of_ddp"]
    assert "the trainable parameters ['fc1.lora_A', 'fc1.lora_B'] are not in this DistributedDataParallel " \
        "wrapper's gradient averaging" in errs["reducer_after_ddp"], errs["reducer_after_ddp"]
    assert errs["user_param_after_ddp"] == "accepted", errs["user_param_after_ddp"]
    assert "static_graph" in errs.get("static_graph", "")
    msg, untouched = errs["sparse_accumulate"]  # refused before any backward ran
    assert "['0']" in msg and "sparse gradients" in msg and untouched
    assert "sync_gradients" in errs["sparse_sync"] and "['0']" in errs["sparse_sync"]
    msg, untouched = errs["sn_accumulate_ddp"]  # DDP would have averaged part of the step, raised a step later
    assert "sortednet.distributed.accumulate" in msg and "find_unused_parameters=False" in msg and untouched
    kind, msg, quick = errs["sn_accumulate_ddp_depths"]  # (rank 0, at full depth: it waited for the timeout)
    assert kind == "SortedNetError" and "DistributedDataParallel forward" in msg and quick, msg
    assert "each rank would train its own copy" in errs.get("fit_multi_rank", "")
    assert "sortednet.distributed.save" in errs.get("export_sharded", "")
    assert "check before fully_shard" in errs.get("check_sharded", "")
    assert "module=ddp_model" in errs["module_left_out"]
    assert "module=ddp_model" in errs["module_inner"] and "naming the model inside" in errs["module_inner"]
    for fam, (before, after) in errs["costs_sharded"].items():  # (and the sub-model pick chooses by them)
        assert after == before, (fam, after[-1])
    for key in ("other_order", "other_k"):  # (rank 0's record; every rank raised, or the run would hang)
        assert "ranks disagree on the sub-models" in errs[key] and "rank 1 has" in errs[key], errs[key]


def test_a_fault_on_one_rank_raises_on_every_rank(run):
    """Each of these hung the other rank (its next collective waited for ever), or averaged silently."""
    _, results = run
    errs = results["errors"]
    expect = {  # key -> (the faulty rank's error, the other rank's)
        "bad_weights_one_rank": ("weights must be 2", "rank 1 refused: weights must be 2"),
        "bad_nonfinite_one_rank": ("nonfinite= must be one of", "rank 1 refused: nonfinite="),
        "other_weights": ("ranks disagree on the sub-models (and weights", "ranks disagree on the sub-models"),
        "refused_loss_one_rank": ("does not require grad", "failed on another rank"),
        "closure_raises_one_rank": ("ValueError: no batch", "reached different points of the step"),
        "save_missing_folder": ("does not exist", "rank 0 could not write the checkpoint"),
    }
    for key, (faulty, other) in expect.items():
        got = errs[key]
        at = 0 if key == "save_missing_folder" else 1
        assert faulty in got[at] and other in got[1 - at], (key, got)
    assert errs["ranks_still_in_step"] == ["accepted"] * WORLD
    # a rank in save met one still stepping (it waited for the process group's timeout, then blamed a rank-0-only
    # call): both raise at once, naming the cause
    for e in errs["save_while_a_rank_steps"]:
        assert "reached different points" in e and "sortednet.distributed.save" in e and "numbers of steps" in e, e
    assert errs["ranks_still_in_step_after_save"] == ["accepted"] * WORLD
    assert all("calibrate() runs in one process" in e for e in errs["calibrate_multi_rank"])
    assert all("scores units from data" in e for e in errs["sort_taylor_multi_rank"])
    assert errs["sort_l1_multi_rank"] == ["accepted"] * WORLD and errs["sorted_replicas_equal"]
    assert len(errs["sort_sharded"]) == 2 and all("sort in one process, before fully_shard" in e
                                                  for e in errs["sort_sharded"])


def test_replicas_that_differ_are_refused_on_every_rank_before_they_train(run):
    """Accepted in silence before: models built with a seed per rank in plain processes (no DDP broadcast), two
    ranks slicing different layers under the same sub-model names, a parameter frozen on one rank only (the
    flat buckets shifted: other parameters' gradients averaged together; or gloo aborted the process on a size
    mismatch), and, under FSDP2, a task head the closure trains outside module= (each rank kept its own). Every
    rank raises; fp16 gradients are divided before the sum, as DDP does, and do not overflow."""
    _, results = run
    errs = results["errors"]
    for e in errs["seed_per_rank_plain"]:
        assert "the ranks' models differ, in their weights" in e, e
    assert errs["alike_first_step"] == errs["loaded_on_every_rank"] == ["accepted"] * WORLD
    for e in errs["loaded_on_one_rank"]:
        assert "the ranks' models differ, in their weights" in e and "since the last step" in e, e
    assert errs["wide_first_step"] == errs["outer_first_step"] == ["accepted"] * WORLD
    for e in errs["loaded_one_value_on_one_rank"]:  # (a value the sampled digest does not read)
        assert "the ranks' models differ" in e and "'0.weight' differs between rank 0 and rank 1" in e, e
    assert errs["sorted_on_one_rank_first"] == errs["swapped_on_one_rank_first"] == ["accepted"] * WORLD
    for key in ("sorted_on_one_rank", "swapped_on_one_rank"):
        for e in errs[key]:
            assert "units sorted on some ranks only" in e and "'0.weight' differs between rank 0 and rank 1" in e, (
                key, e)
    for key, name in [("head_loaded_on_one_rank", "2.weight"), ("head_loaded_on_one_rank_again", "2.weight"),
                      ("late_head_loaded_on_one_rank", "3.weight"), ("frozen_loaded_on_one_rank", "0.0.bias")]:
        for e in errs[key]:  # (a load into a part of module= outside the wrapped model, a retry, a late part, a
            assert "the ranks' models differ" in e and f"{name!r} differs between rank 0 and rank 1" in e, (
                key, e)  # frozen parameter)
    assert errs["outer_alike_again"] == errs["outer_frozen_alike"] == ["accepted"] * WORLD
    assert errs["fsdp2_first_step"] == errs["fsdp2_loaded_on_every_rank"] == ["accepted"] * WORLD
    for e in errs["fsdp2_loaded_on_one_rank"]:
        assert "a sharded (FSDP2) model was loaded into on some ranks only" in e, e
    assert errs["seed_per_rank_grads"]
    for e in errs["other_nest_same_names"]:
        assert "ranks disagree on the sub-models (and weights, distill=, nonfinite=, the nest)" in e and "nest=" in e, e
    for key in ("frozen_other_parameter", "frozen_on_one_rank"):
        for e in errs[key]:
            assert "sync_gradients: the ranks would average different parameters" in e, (key, e)
    torch.testing.assert_close(errs["fp16_sync"], torch.full((2, 2), 40000.0))
    for e in errs["fsdp2_head_outside"]:
        assert "the closure trains 2 parameter(s) outside module=" in e, e
    assert errs["fsdp2_head_grads"]


def test_a_ddp_wrapper_with_its_own_process_group_is_averaged_over_that_group_only(run):
    """DDP(process_group=a one-rank group): accumulate averaged over the whole world anyway (0.07 off)."""
    _, results = run
    assert results["errors"]["own_group_grad_error"] < 1e-6


def test_sharded_save_and_ranks_switching_inside_the_closure_are_refused_on_every_rank(run):
    _, results = run
    errs = results["errors"]
    assert errs["save_sharded"] and all("sortednet.distributed.save" in e for e in errs["save_sharded"])
    for how in ("ddp", "fsdp2", "ddp_compiled"):  # (rank 0's record; rank 1 raised too, or the run would hang)
        e = errs[f"closure_use_{how}"]
        assert "ranks disagree on the sub-model of a forward" in e and "rank 1 has" in e, e


def test_ranks_running_other_submodels_through_ddp_in_sn_accumulate_are_refused_before_any_backward(run):
    """sn.accumulate (not the distributed one) through a DDP wrapper, with each rank's Sampler seeded by its
    rank: DDP averaged two sub-models' gradients as one, in silence."""
    msg, untouched = run[1]["errors"]["sn_accumulate_other_subs"]
    assert "ranks disagree on the sub-model of a DistributedDataParallel forward" in msg and untouched, msg


def test_a_trained_parameter_outside_what_accumulate_averages_is_refused_on_every_rank(run):
    """snd.accumulate without module=, the closure calling nn.Sequential(model, head): the head's gradients
    were never averaged and the replicas drifted apart (0.05 after 3 steps), with no word. A frozen head is
    fine."""
    errs = run[1]["errors"]
    msg, untouched = errs["head_outside"]
    assert "trains 2 parameter(s) outside the nest's model (shapes [[2, " in msg and "SGD steps them" in msg, msg
    assert untouched and errs["frozen_head_outside"] and errs["unstepped_teacher_outside"]


def test_sn_accumulate_through_ddp_under_join_with_uneven_inputs_finishes(run):
    assert run[1]["errors"]["join_uneven"] == "finished"


def test_parameters_outside_the_nest_in_the_ddp_wrapper_are_averaged(run):
    """A task head next to the nested model inside one DDP wrapper: its gradient is the global batch's mean
    on every rank (it was each rank's own: the replicas drifted apart)."""
    _, results = run
    every = results["errors"]["outer_head_grads"]
    case, nest = _build("mlp", "ddp")
    head = torch.nn.Linear(case.model(case.example).shape[-1], 2)
    torch.manual_seed(5)
    torch.nn.init.normal_(head.weight)
    outer = torch.nn.Sequential(case.model, head)
    x = _batch("mlp", 0)
    sn.accumulate(nest, [nest.smallest, nest.largest], lambda: _loss(outer(x)))
    for head_grad, fc1_grad in every:
        torch.testing.assert_close(head_grad, head.weight.grad, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(fc1_grad, case.model.fc1.weight.grad, atol=1e-6, rtol=1e-5)


def test_fsdp2_root_unit_is_resharded_after_a_skipped_last_submodel_and_survives_an_eval_forward(run):
    _, results = run
    errs = results["errors"]
    assert errs["fsdp_resharded_after_skip"] is True
    assert errs["fsdp_after_eval_forward"] == "ok"
    got, want = errs["fsdp_eval_before_step"]
    assert got == pytest.approx(want, rel=1e-6)


def test_a_nonfinite_loss_on_one_rank_is_skipped_on_every_rank(run):
    """nonfinite='skip' is decided once for all ranks: rank 0's NaN loss of the smallest sub-model makes
    rank 1 skip it too, so the synchronised gradient is the largest's alone (the ranks' runs stay alike)."""
    _, results = run
    errs = results["errors"]
    case, nest = _build("mlp", "ddp")
    assert errs["nonfinite_skipped"] == [[str(nest.smallest)]] * WORLD
    with nest.use(nest.largest):
        (_loss(case.model(case.example)) * 0.5).backward()  # weight 1/2: the largest of two, the other skipped
    torch.testing.assert_close(errs["grad_after_skip"], case.model.fc1.weight.grad, atol=1e-6, rtol=1e-5)


def test_sync_gradients_averages_and_keeps_none_where_no_rank_has_a_gradient(run):
    _, results = run
    for got in results["errors"]["sync_all_ranks"]:
        assert got["calls"] == 2  # bucket_bytes=1: one collective per parameter
        torch.testing.assert_close(got["one_rank"], torch.full((2, 3), 0.5))  # (1 + 0) / 2
        assert got["no_rank"] is None
        torch.testing.assert_close(got["both"][0], torch.full((2, 3), 1.5))
        torch.testing.assert_close(got["both"][1], torch.full((2,), 5.0))


@pytest.mark.parametrize("how", ["bn_buffers", "bn_buffers_plain"], ids=["ddp", "plain_processes"])
def test_batchnorm_statistics_under_ddp_are_the_first_ranks_on_every_rank(run, how):
    _, results = run
    got = results[how]
    ranks, alone = got["ranks"], got["rank0_alone"]
    stats = [k for k in alone if k.endswith("running_mean")]
    assert stats and any(not torch.equal(ranks[0][k], torch.zeros_like(ranks[0][k])) for k in stats)
    for k in alone:
        assert torch.equal(ranks[1][k], ranks[0][k]), k
        torch.testing.assert_close(ranks[0][k].double(), alone[k].double(), atol=1e-5, rtol=0, msg=k)


def test_parameters_ddp_ignores_keep_each_ranks_gradient(run):
    """DDP._set_params_and_buffers_to_ignore_for_model: DDP leaves those gradients local; accumulate averaged them."""
    _, results = run
    (local0, shared0), (local1, shared1) = results["errors"]["ignored_grads"]
    assert not torch.allclose(local0, local1)  # each rank's own data
    torch.testing.assert_close(shared0, shared1)
    assert results["errors"]["ignored_skipped_blocks"] == "ok"


def test_a_tied_weight_saved_from_fsdp2_loads_in_one_process_still_tied(run):
    out, results = run
    fresh = _TiedLM()
    loaded = sn.load(fresh, os.path.join(out, "tied-fsdp2.safetensors"))
    assert fresh.head.weight is fresh.emb.weight and loaded.submodels == _tied_nest(_TiedLM()).submodels
    for k, v in results["errors"]["tied_state"].items():
        torch.testing.assert_close(fresh.state_dict()[k], v, atol=0, rtol=0)


def test_fsdp2_misuse_is_named(run, fresh_dynamo):
    _, results = run
    errs = results["errors"]
    assert "sn.load into a model sharded with FSDP2" in errs["load_into_sharded"]
    assert "nest.compile() of a model sharded with FSDP2" in errs["compile_sharded"]
    assert "profile before fully_shard" in errs["profile_sharded"]
    for key in ("fsdp1_then_wrap", "wrap_then_fsdp1"):
        assert "FSDP1" in errs[key] and "fully_shard" in errs[key], errs[key]
    assert errs["outer_root_sharded"] == "ok", errs["outer_root_sharded"]
    assert all("['extra.weight', 'extra.bias'] are in no fully_shard unit" in e for e in errs["routed_unsharded"])
    msg, untouched = errs["root_unsharded"]
    assert "in no fully_shard unit" in msg and "'emb.weight'" in msg and untouched, msg
    # (a tie across units: was "the model changed after wrap ... nest.unwrap(), change the model, then wrap it again")
    assert "tied parameters of the wrapped model are apart now (['0.2.weight / 1.2.weight'])" in errs["tie_split"] \
        and "Keep tied modules in one unit" in errs["tie_split"], errs["tie_split"]


def test_a_part_given_to_fsdp1_beside_the_nest_trains_as_in_one_process(run):
    """docs/scaling.md: a part no dimension slices may be given to FSDP1. snd.accumulate averaged its gradients
    again after FSDP1 had reduced them into each rank's shard (head 1.4e-2 off one process, the nest 2e-4 after
    3 steps); with use_orig_params=True the ranks' shards differ in length and gloo aborted both processes. The
    parameters of its ignored_modules= are not FSDP1's to reduce: they are averaged as any other."""
    _, results = run
    body, head, nest = _body_and_head()
    opt = torch.optim.SGD([*nest.trainable_parameters(), *head.parameters()], lr=0.1)
    sampler = sn.Sampler(nest.submodels, k=2, seed=0)
    for step in range(3):
        x, y = _head_batch(step)
        sn.accumulate(nest, sampler.draw(step), lambda: F.cross_entropy(head(body(x)), y))  # noqa: B023
        opt.step()
        opt.zero_grad()
    for orig in (False, True, "ignored"):
        for rank_out in results["fsdp1_head"]:
            got_body, got_head = rank_out[f"fsdp1_head_{orig}"]
            for want, got in ((body.state_dict(), got_body), (head.state_dict(), got_head)):
                for k, v in want.items():
                    torch.testing.assert_close(got[k], v, rtol=1e-12, atol=1e-12, msg=f"{k} (use_orig_params={orig})")


def test_ranks_running_other_submodels_through_fsdp2_in_sn_accumulate_are_refused(run):
    """Through DDP, sn.accumulate checks that every rank runs the same sub-model; through FSDP2 it did not: two
    widths' gradients were averaged as one (and ranks at other depths waited on each other until the timeout)."""
    _, results = run
    for rank_out in results["fsdp1_head"]:
        assert "ranks disagree on the sub-model of an FSDP2 forward" in rank_out["fsdp2_other_draws"], rank_out


def test_single_process_helpers_are_no_ops():
    case, nest = _build("lm_width_heads_depth", "ddp")
    sub = nest.resolve({"depth": 1})
    with nest.use(sub):
        _loss(case.model(case.example)).backward()
    before = {n: None if p.grad is None else p.grad.clone() for n, p in case.model.named_parameters()}
    assert snd.sync_gradients(case.model) == 0
    snd.check_submodels([sub])
    for n, p in case.model.named_parameters():
        assert (p.grad is None) == (before[n] is None) and (p.grad is None or torch.equal(p.grad, before[n]))
    assert any(g is None for g in before.values())  # depth-skipped blocks got no gradient


def test_wrapping_a_data_parallel_wrapper_is_refused_naming_the_model_inside(fresh_dynamo):
    """sn.wrap(nn.DataParallel(model)) took 'module.' patterns, wrote 'module.' checkpoint keys and exported the
    wrapper with a confusing error: refused, pointing at the model inside, before anything changed."""
    case = FAMILIES["mlp"](seed=0)
    holder = torch.nn.DataParallel(case.model)
    before = {k: v.clone() for k, v in holder.state_dict().items()}
    with pytest.raises(sn.SortedNetError, match=r"'<root>' is a DataParallel wrapper: call sn.wrap on the model "
                                                r"inside it \(sn.wrap\(dp.module, ...\)"):
        sn.wrap(holder, sn.Width("h1", [4, 20], out="module.fc1", inp="module.fc2"))
    assert not any("_sn" in m.__dict__ for m in holder.modules())
    assert all(torch.equal(v, before[k]) for k, v in holder.state_dict().items())
    with pytest.raises(sn.SortedNetError, match=r"'<root>' is a DataParallel wrapper \(compiled\)"):
        sn.wrap(torch.compile(holder), sn.Width("h1", [4, 20], out="_orig_mod.module.fc1",
                                                inp="_orig_mod.module.fc2"))
    sn.wrap(case.model, *case.dims)  # (the model inside, as asked)

    class Holder(torch.nn.Module):  # (a DataParallel child on one device, or none: it just calls its module)
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.body = torch.nn.DataParallel(torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(),
                                                                  torch.nn.Linear(8, 2)))

        def forward(self, x):
            return self.body(x)

    x = torch.randn(3, 4)
    nest = sn.wrap(Holder(), sn.Width("h", [4, 8], out="body.module.0", inp="body.module.2"), example=x)
    with torch.no_grad(), nest.use("h=4"):
        torch.testing.assert_close(nest.export("h=4")(x), nest.model(x))


def test_accumulate_rejects_a_module_without_the_nest():
    case, nest = _build("mlp", "ddp")
    with pytest.raises(sn.SortedNetError, match="does not contain this nest's model"):
        snd.accumulate(nest, [nest.smallest], lambda: _loss(case.model(case.example)),
                       module=torch.nn.Linear(2, 2))


def test_save_called_by_rank_zero_alone_says_it_is_collective(tmp_path, monkeypatch):
    """`if rank == 0: snd.save(...)`: rank 0 wrote the file, then waited in the closing broadcast until the
    process group's timeout (30 min by default) and died with gloo's raw "Timed out" error, naming nothing.
    The failed collective is now a SortedNetError that says the call is collective (the timeout itself is
    gloo's: simulated here in one process). The agreement comes first (a DDP save of ranks out of step wrote
    over the file, then raised), so nothing is written; where the closing broadcast fails, rank 0 wrote."""
    case, nest = _build("mlp", "ddp")

    def timed_out(*args, **kwargs):
        raise RuntimeError("[gloo] Timed out waiting 1800000ms for recv operation to complete")

    monkeypatch.setattr(snd, "_active", lambda: True)
    monkeypatch.setattr(dist, "get_rank", lambda group=None: 0)
    monkeypatch.setattr(snd, "_sync", timed_out)
    path = tmp_path / "n.safetensors"
    with pytest.raises(sn.SortedNetError, match=r"is collective: every rank must call it .*agreement failed on rank 0"
                                                r".*; nothing was written"):
        snd.save(nest, str(path))
    assert not path.exists()
    monkeypatch.setattr(snd, "_sync", lambda *args, **kwargs: None)
    monkeypatch.setattr(dist, "broadcast_object_list", timed_out)
    with pytest.raises(sn.SortedNetError, match=r"is collective: every rank must call it .* rank 0 wrote"):
        snd.save(nest, str(path))
    assert path.exists()


def test_fsdp1_is_refused_before_it_flattens_a_layer_no_dimension_slices():
    """FSDP1 was refused only when it came to remove the first sliced parameter: the unsliced layers before it
    had already lost theirs (plain tensors, no longer in named_parameters: an optimizer built afterwards, even
    after unwrap, never trained them). Refused at FullyShardedDataParallel(...) now, before any change (no
    process group is needed to see it)."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    from models import assert_unchanged, snapshot

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 6), torch.nn.Linear(6, 32), torch.nn.ReLU(),
                                torch.nn.Linear(32, 4))
    sn.wrap(model, sn.Width("h", [8, 32], out="1", inp="3"))
    before, names = snapshot(model), [n for n, _ in model.named_parameters()]
    with pytest.raises(sn.SortedNetError, match=r"FullyShardedDataParallel \(FSDP1\): '1' is sliced by sortednet.*"
                                                r"refused before FSDP1 changed anything.*fully_shard"):
        FullyShardedDataParallel(model, device_id=torch.device("cpu"))
    assert_unchanged(model, before)
    assert [n for n, _ in model.named_parameters()] == names
    assert type(model[0]._parameters["weight"]) is torch.nn.Parameter


def test_loads_into_an_fsdp2_rank_nest_are_refused_before_any_copy(run):
    """FSDP2's own load hooks switched the load checks off (a nest of other ranks half-loaded, then a raw size
    mismatch; a base checkpoint into a lora nest with strict=True half-loaded, then missing keys), and
    set_model_state_dict's filling of missing keys with the model's own U / V let a pre-wrap svd weight through
    (with strict=False: a silently mixed model). Each is refused with a SortedNetError, nothing changed."""
    _, results = run
    for name, (said, changed) in results["fsdp2_loads"].items():
        assert said.startswith("SortedNetError"), (name, said)
        assert changed == [], (name, changed)


def test_a_rank_whose_closure_failed_raises_its_own_error_when_the_check_itself_fails():
    """Under FSDP2 an error part-way through a forward leaves the other ranks in the next unit's all-gather: the
    check after the closure then fails with the process group's timeout, which replaced this rank's own error
    (the ValueError was lost: no __cause__, no __context__). This rank raises its own error now, the timeout as
    its cause; an agreement that says the others were told still raises it without a cause."""
    model = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 2))
    nest = sn.wrap(model, sn.Width("h", [4, 8], out="0", inp="1"))

    def closure():
        raise ValueError("rank 1: bad batch")

    def timed_out(bad, failed):
        assert failed
        raise RuntimeError("[gloo] Timed out waiting 20000ms for recv")

    with pytest.raises(ValueError, match="bad batch") as info:
        sn.accumulate(nest, nest.submodels, closure, _agree=timed_out)
    assert isinstance(info.value.__cause__, RuntimeError)

    def told(bad, failed):
        raise sn.SortedNetError("the others were told")

    with pytest.raises(ValueError, match="bad batch") as info:
        sn.accumulate(nest, nest.submodels, closure, _agree=told)
    assert info.value.__cause__ is None
    assert all(p.grad is None for p in model.parameters())


def test_a_group_or_bucket_size_of_another_type_is_refused_by_name():
    """group="g" reached torch as a raw AttributeError ('str' object has no attribute 'size') on every rank;
    bucket_bytes="x" a raw TypeError after the agreement collective, and -1 went through. Refused up front
    (no process group needed to see it)."""
    case, nest = _build("mlp", "ddp")
    closure = lambda: _loss(case.model(case.example))  # noqa: E731
    with pytest.raises(sn.SortedNetError, match=r"accumulate\(group=...\) takes a process group .* got str 'g'"):
        snd.accumulate(nest, [nest.smallest], closure, group="g")
    for bad in ("x", -1, 0, True, 1.5):
        with pytest.raises(sn.SortedNetError, match=r"sync_gradients\(bucket_bytes=...\) takes a positive int"):
            snd.sync_gradients(nest.model, bucket_bytes=bad)
    for fn in (lambda: snd.sync_gradients(nest.model, group=3), lambda: snd.sync_buffers(nest.model, group=3),
               lambda: snd.check_submodels(["h=4"], group=3)):
        with pytest.raises(sn.SortedNetError, match=r"\(group=...\) takes a process group"):
            fn()
    assert all(p.grad is None for p in nest.model.parameters())


def test_distributed_save_of_a_model_or_its_copy_names_what_to_call(tmp_path):
    """snd.save(ema, path) of a deep copy (an EMA) said only 'needs a Nest', while sn.save(ema, path) on one rank
    saves it: the message names both ways (the model itself: its nest)."""
    model = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 2))
    nest = sn.wrap(model, sn.Width("h", [4, 8], out="0", inp="1"))
    ema = copy.deepcopy(model)
    for given in (model, ema):
        with pytest.raises(sn.SortedNetError, match=r"needs a Nest .* sn.Nest.of\(model\).* sn.save\(copy, path\)"):
            snd.save(given, tmp_path / "c.safetensors")
    sn.save(ema, tmp_path / "c.safetensors")
    snd.save(nest, tmp_path / "d.safetensors")
