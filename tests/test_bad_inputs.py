"""Invariant 9 across the public API (issue 10): more bad inputs, each a
SortedNetError naming the fault, with the model exactly as it was (classes,
Parameter objects, bit-exact tensors, hooks, outputs) and the nest's active
sub-model unchanged. The first table lives in test_errors.py."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

import sortednet as sn
from models import FAMILIES, assert_unchanged, run, snapshot
from sortednet import Width
from sortednet import checkpoint as ck
from sortednet import distributed as snd
from sortednet.train import evaluate as sn_evaluate


def mlp():
    c = FAMILIES["mlp"]()
    return c, sn.wrap(c.model, *c.dims)


def cnn():
    c = FAMILIES["cnn_bn_residual"]()
    return c, sn.wrap(c.model, *c.dims)


def closure(c, value):
    return lambda: value(c.model(c.example))


# name -> (build(tmp) -> (case, nest or None, action), needles)
def B(build, *needles):
    return build, needles


def _on(make, act):
    def build(tmp):
        c, nest = make()
        return c, nest, lambda: act(c, nest, tmp)
    return build


def _fresh(act):
    def build(tmp):
        c = FAMILIES["mlp"]()
        return c, None, lambda: act(c, tmp)
    return build


def _fit(c, nest, batches, lr=0.0, **kw):
    opt = torch.optim.SGD(c.model.parameters(), lr=lr)
    return sn.fit(nest, batches, opt, sn.Sampler(nest.submodels, k=1, seed=0), **{"progress": False, **kw})


def _incomplete(tmp):
    c = FAMILIES["mlp"]()
    nest = sn.wrap(c.model, Width("h1", [8, 16], out="fc1"))   # fc2's input is not sliced

    def action():
        with nest.use("h1=8"):
            nest(c.example)
    return c, nest, action


def _saved(tmp):
    c, nest = mlp()
    path = os.path.join(tmp, "n.safetensors")
    sn.save(nest, path)
    return c, nest, path


def _unwrapped_save(tmp):
    c, nest = mlp()
    nest.unwrap()
    return c, None, lambda: sn.save(nest, os.path.join(tmp, "x.safetensors"))


def _unwrapped_load(tmp):
    c, nest, path = _saved(tmp)
    nest.unwrap()
    return c, None, lambda: sn.load(nest, path)


TABLE = {
    "save_not_a_nest": B(_fresh(lambda c, tmp: sn.save(c.model, os.path.join(tmp, "m.safetensors"))),
                         "needs a Nest", "MLP"),
    "save_missing_folder": B(_on(mlp, lambda c, n, tmp: sn.save(n, os.path.join(tmp, "no", "m.safetensors"))),
                             "does not exist", "no"),
    "save_onto_a_folder": B(_on(mlp, lambda c, n, tmp: sn.save(n, tmp)), "is a folder"),
    "save_unwrapped_nest": B(_unwrapped_save, "unwrapped"),
    "load_unwrapped_nest": B(_unwrapped_load, "unwrapped"),
    "load_path_not_a_path": B(_fresh(lambda c, tmp: sn.load(c.model, 123)), "file path", "int"),
    "load_into_a_string": B(_fresh(lambda c, tmp: sn.load("model", os.path.join(tmp, "x"))), "nn.Module", "str"),
    "load_a_folder": B(_fresh(lambda c, tmp: sn.load(c.model, tmp)), "cannot read"),
    "pick_complex": B(_on(mlp, lambda c, n, t: n.pick(params=1 + 1j)), "params=", "complex"),
    "pick_list": B(_on(mlp, lambda c, n, t: n.pick(params=[100])), "params=", "list"),
    "pick_string": B(_on(mlp, lambda c, n, t: n.pick(params="100")), "params=", "str"),
    "pick_bool": B(_on(mlp, lambda c, n, t: n.pick(params=True)), "params=", "bool"),
    "pick_nan": B(_on(mlp, lambda c, n, t: n.pick(params=float("nan"))), "not a number"),
    "pick_fraction_string": B(_on(mlp, lambda c, n, t: n.pick(fraction="0.5")), "fraction=", "str"),
    "pick_fraction_zero": B(_on(mlp, lambda c, n, t: n.pick(fraction=0)), "fraction", "(0, 1]"),
    "pick_fraction_tiny": B(_on(mlp, lambda c, n, t: n.pick(fraction=1e-9)), "fraction=1e-09 of the largest"),
    "pick_unknown_metric": B(_on(mlp, lambda c, n, t: n.pick(latency=1.0)), "'latency'", "profile"),
    "use_arabic_digit": B(_on(mlp, lambda c, n, t: n.use("h1=\u0664").__enter__()), "cannot parse", "h1="),
    "use_fullwidth_digit": B(_on(mlp, lambda c, n, t: n.use("h1=\uff18").__enter__()), "cannot parse"),
    "use_empty_size": B(_on(mlp, lambda c, n, t: n.use("h1=").__enter__()), "cannot parse", "'h1='"),
    "use_huge_size": B(_on(mlp, lambda c, n, t: n.use("h1=" + "9" * 40).__enter__()), "cannot parse"),
    "use_meta_tensor_size": B(_on(mlp, lambda c, n, t: n.use({"h1": torch.tensor(8, device="meta")}).__enter__()),
                              "has no size", "h1"),
    "use_two_element_tensor_size": B(_on(mlp, lambda c, n, t: n.use({"h1": torch.tensor([8, 8])}).__enter__()),
                                     "has no size", "h1"),
    "use_float_size": B(_on(mlp, lambda c, n, t: n.use({"h1": 8.0}).__enter__()), "has no size 8.0",
                        "a float: sizes here are integers"),
    "use_fraction_size": B(_on(mlp, lambda c, n, t: n.use({"h1": 0.5}).__enter__()), "has no size 0.5",
                           "sn.from_transformers"),
    "compile_unknown_mode": B(_on(mlp, lambda c, n, t: n.compile(mode="fastest")), "nest.compile(mode='fastest')",
                              "torch.compile refuses"),
    "compile_unknown_backend": B(_on(mlp, lambda c, n, t: n.compile(backend="nope")), "backend='nope'",
                                 "torch.compile refuses"),
    "compile_fullgraph_string": B(_on(mlp, lambda c, n, t: n.compile(fullgraph="no")), "fullgraph takes True or False"),
    "compile_dynamic_string": B(_on(mlp, lambda c, n, t: n.compile(dynamic="yes")), "dynamic takes True or False"),
    "checkpoint_reentrant_string": B(_on(mlp, lambda c, n, t: n.checkpoint(c.model, c.example,
                                                                          use_reentrant="False")),
                                     "use_reentrant='False'", "True or False"),
    "use_an_int": B(_on(mlp, lambda c, n, t: n.use(8).__enter__()), "expected a SubModel", "int"),
    "use_a_list": B(_on(mlp, lambda c, n, t: n.use(["h1=4"]).__enter__()), "expected a SubModel", "list"),
    "cost_flops_wrong_shape": B(_on(mlp, lambda c, n, t: n.cost("h1=4", "flops", example=torch.randn(2, 3))),
                                "h1=4", "(2, 3)", "flops"),
    "profile_wrong_example": B(_on(mlp, lambda c, n, t: n.profile(torch.randn(2, 3), progress=False)),
                               "profile", "h1=4,h2=4", "(2, 3)"),
    "profile_score_string": B(_on(mlp, lambda c, n, t: n.profile(c.example, metrics=("params",), progress=False,
                                                                  score=lambda s: "good")), "score(", "'good'"),
    "profile_score_none": B(_on(mlp, lambda c, n, t: n.profile(c.example, metrics=("params",), progress=False,
                                                                score=lambda s: None)), "score(", "NoneType"),
    "profile_unknown_metric": B(_on(mlp, lambda c, n, t: n.profile(c.example, metrics=("watts",),
                                                                    progress=False)), "'watts'"),
    "profile_repeat_zero": B(_on(mlp, lambda c, n, t: n.profile(c.example, repeat=0, progress=False)), "repeat"),
    "fit_three_tuples": B(_on(mlp, lambda c, n, t: _fit(c, n, [(c.example, c.example, c.example)])),
                          "(inputs, target) pairs", "3 items"),
    "fit_bare_tensors": B(_on(mlp, lambda c, n, t: _fit(c, n, [c.example])), "(inputs, target) pairs", "Tensor"),
    "fit_not_a_sampler": B(_on(mlp, lambda c, n, t: sn.fit(n, [], torch.optim.SGD(c.model.parameters(), lr=0.1),
                                                           [n.largest])), "Sampler", "list"),
    "accumulate_complex_loss": B(_on(mlp, lambda c, n, t: sn.accumulate(n, [n.largest], closure(
        c, lambda y: (y.sum() * (1 + 1j))))), "complex"),
    "accumulate_vector_loss": B(_on(mlp, lambda c, n, t: sn.accumulate(n, [n.largest], closure(c, lambda y: y))),
                                "scalar loss"),
    "accumulate_detached_loss": B(_on(mlp, lambda c, n, t: sn.accumulate(n, [n.largest], closure(
        c, lambda y: y.sum().detach()))), "does not require grad"),
    "distill_one_d_logits": B(_on(mlp, lambda c, n, t: sn.accumulate(n, [n.smallest, n.largest], closure(
        c, lambda y: (y.square().mean(), y.sum(-1))), distill=sn.Distill())), "logits of", "(batch, classes)"),
    "distill_integer_logits": B(_on(mlp, lambda c, n, t: sn.accumulate(n, [n.smallest, n.largest], closure(
        c, lambda y: (y.square().mean(), y.argmax(-1, keepdim=True).expand_as(y))), distill=sn.Distill())),
        "floating point", "torch.int64"),
    "distill_temperature_bool": B(_on(mlp, lambda c, n, t: sn.Distill(temperature=True)), "temperature", "True"),
    "distill_alpha_bool": B(_on(mlp, lambda c, n, t: sn.Distill(alpha=False)), "alpha", "False"),
    "distill_temperature_negative": B(_on(mlp, lambda c, n, t: sn.Distill(temperature=-1.0)), "temperature"),
    "width_out_without_inp": B(_incomplete, "'h1'", "inp=", "fc1"),
    "sampler_k_zero": B(_on(mlp, lambda c, n, t: sn.Sampler(n.submodels, k=0)), "k=0"),
    "sampler_k_too_big": B(_on(mlp, lambda c, n, t: sn.Sampler(n.submodels, k=99)), "k=99"),
    "sampler_unknown_strategy": B(_on(mlp, lambda c, n, t: sn.Sampler(n.submodels, k=1, strategy="best")),
                                  "'best'"),
    "sampler_negative_weights": B(_on(mlp, lambda c, n, t: sn.Sampler(n.submodels, k=1, strategy="weighted",
                                                                      weights=[-1] * len(n.submodels))),
                                  "non-negative"),
    "sampler_weights_length": B(_on(mlp, lambda c, n, t: sn.Sampler(n.submodels, k=1, strategy="weighted",
                                                                    weights=[1.0])), "1 entries"),
    "sampler_of_a_string": B(_on(mlp, lambda c, n, t: sn.Sampler("h1=4", k=1)), "sequence", "str"),
    "sampler_negative_step": B(_on(mlp, lambda c, n, t: sn.Sampler(n.submodels, k=1).draw(-1)), "step", "-1"),
    "sampler_state_other_list": B(_on(mlp, lambda c, n, t: sn.Sampler(n.submodels, k=1).load_state_dict(
        sn.Sampler(n.submodels[:2], k=1).state_dict())), "sampler state"),
    "wrap_submodels_string": B(_fresh(lambda c, t: sn.wrap(c.model, *c.dims, submodels="h1=4")), "list", "str"),
    "wrap_submodels_empty": B(_fresh(lambda c, t: sn.wrap(c.model, *c.dims, submodels=[])), "empty"),
    "depth_largest_not_the_layer_count": B(_fresh(lambda c, t: sn.wrap(
        torch.nn.Sequential(*[torch.nn.Linear(4, 4) for _ in range(6)]), sn.Depth("d", [2, 4], layers=""))),
        "largest size 4 gives 4 layers but", "has 6"),
    "distill_one_dimensional_logits": B(_fresh(lambda c, t: sn.Distill().soft_loss(torch.randn(5), torch.randn(5))),
                                        "floating-point logits of shape (..., classes)", "(5,)"),
    # the model (or None) where the Nest goes: raw AttributeErrors before
    "accumulate_of_the_model": B(_on(mlp, lambda c, n, t: sn.accumulate(c.model, [n.smallest], lambda: 0)),
                                 "accumulate() needs the Nest", "MLP", "the model itself"),
    "accumulate_of_none": B(_on(mlp, lambda c, n, t: sn.accumulate(None, [n.smallest], lambda: 0)),
                            "accumulate() needs the Nest", "NoneType"),
    "distributed_accumulate_of_the_model": B(_on(mlp, lambda c, n, t: snd.accumulate(c.model, [n.smallest],
                                                                                   lambda: 0)),
                                             "sortednet.distributed.accumulate() needs the Nest"),
    "evaluate_of_the_model": B(_on(mlp, lambda c, n, t: sn_evaluate(c.model, (c.example, None))),
                               "evaluate() needs the Nest"),
    "sync_gradients_of_the_nest": B(_on(mlp, lambda c, n, t: snd.sync_gradients(n)), "sync_gradients()",
                                    "nest.model"),
    "check_submodels_of_none": B(_on(mlp, lambda c, n, t: snd.check_submodels(None)), "check_submodels()",
                                 "NoneType"),
    "check_submodels_of_one_submodel": B(_on(mlp, lambda c, n, t: snd.check_submodels(n.smallest)),
                                         "check_submodels()", "SubModel"),  # (its keys were compared: always agree)
    # fit's default loss on data evaluate refused by name: raw TypeError / RuntimeError / IndexError before
    "fit_numpy_targets": B(_on(mlp, lambda c, n, t: _fit(c, n, [(c.example, np.zeros(6, dtype=np.int64))], lr=0.1)),
                           "targets of step 0 are a numpy array", "torch.as_tensor"),
    "fit_numpy_inputs": B(_on(mlp, lambda c, n, t: _fit(c, n, [(c.example.numpy(), torch.zeros(6, dtype=torch.long))],
                                                        lr=0.1)), "on the inputs of step 0, a numpy array"),
    "fit_list_targets": B(_on(mlp, lambda c, n, t: _fit(c, n, [(c.example, [0] * 6)], lr=0.1)),
                          "tensor of class indices", "list"),
    "fit_target_column": B(_on(mlp, lambda c, n, t: _fit(c, n, [(c.example, torch.zeros(6, 1, dtype=torch.long))],
                                                         lr=0.1)), "class indices (batch, ...), here (6,)", "(6, 1)"),
    "fit_target_out_of_range": B(_on(mlp, lambda c, n, t: _fit(c, n, [(c.example, torch.full((6,), 7))], lr=0.1)),
                                 "not a class index in 0..4"),
    "calibrate_batches_zero": B(_on(cnn, lambda c, n, t: n.calibrate([c.example], batches=0)), "batches"),
    "calibrate_without_batchnorm": B(_on(mlp, lambda c, n, t: n.calibrate([c.example])), "no BatchNorm"),
    "export_size_not_listed": B(_on(mlp, lambda c, n, t: n.export("h1=5")), "'h1'", "no size 5"),
    "submodel_int_key": B(_fresh(lambda c, t: sn.SubModel({1: 2})), "dimension names", "1"),
    "submodel_bool_size": B(_fresh(lambda c, t: sn.SubModel(h=True)), "'h'", "True"),
    "profile_dict_malformed": B(_fresh(lambda c, t: sn.Profile.from_dict({"costs": {}})), "Profile"),
    # raw TypeErrors / FileNotFoundError before (a fuzz of the public API)
    "width_pattern_an_int": B(_fresh(lambda c, t: sn.Width("h", [4, 16], out=0, inp="2")), "out patterns", "0"),
    "depth_layers_an_int": B(_fresh(lambda c, t: sn.Depth("d", [1, 2], layers=3)), "patterns", "3"),
    "width_chunks_a_float": B(_fresh(lambda c, t: sn.Width("h", [4, 16], out="0", chunks=2.0)), "chunks=2.0"),
    "width_chunks_a_list": B(_fresh(lambda c, t: sn.Width("h", [4, 16], out="0", chunks=[2])), "chunks=[2]"),
    "cost_metric_a_list": B(_on(mlp, lambda c, n, t: n.cost("h1=4", ["params"])), "metric", "['params']"),
    "check_mixed_none": B(_on(mlp, lambda c, n, t: n.check(c.example, mixed=None)), "mixed", "None"),
    "check_mixed_float": B(_on(mlp, lambda c, n, t: n.check(c.example, mixed=1.5)), "mixed", "1.5"),
    "checkpoint_not_callable": B(_on(mlp, lambda c, n, t: n.checkpoint(None, c.example)), "callable", "None"),
    "save_empty_path": B(_on(mlp, lambda c, n, t: sn.save(n, "")), "empty string"),
    "by_ratio_no_dims": B(_fresh(lambda c, t: sn.by_ratio(None, [0.5])), "list of dimensions", "None"),
    "by_ratio_strings": B(_fresh(lambda c, t: sn.by_ratio(["h"], [0.5])), "list of dimensions"),
    "accumulate_closure_none": B(_on(mlp, lambda c, n, t: sn.accumulate(n, [n.largest], None)), "closure", "None"),
    "accumulate_backward_string": B(_on(mlp, lambda c, n, t: sn.accumulate(n, [n.largest], closure(
        c, lambda y: y.sum()), backward="x")), "backward=", "'x'"),
    "fit_loader_none": B(_on(mlp, lambda c, n, t: _fit(c, n, None)), "loader", "NoneType"),
    "fit_optimizer_string": B(_on(mlp, lambda c, n, t: sn.fit(n, [], "sgd", sn.Sampler(n.submodels, k=1))),
                              "optimizer", "str"),
    "fit_loss_fn_string": B(_on(mlp, lambda c, n, t: sn.fit(n, [], torch.optim.SGD(c.model.parameters(), lr=0.1),
                                                            sn.Sampler(n.submodels, k=1), loss_fn="mse")), "loss_fn"),
    "fit_scheduler_string": B(_on(mlp, lambda c, n, t: sn.fit(n, [], torch.optim.SGD(c.model.parameters(), lr=0.1),
                                                              sn.Sampler(n.submodels, k=1), scheduler="x")),
                              "scheduler", "'x'"),
    "fit_not_a_nest": B(_fresh(lambda c, t: sn.fit(None, [], torch.optim.SGD(c.model.parameters(), lr=0.1),
                                                   sn.Sampler([sn.SubModel(h=1)], k=1))), "Nest", "NoneType"),
    # a second type fuzzer (numbers that are not numbers, orders that are not the user's, flags read by truth)
    "sampler_weights_strings": B(_on(mlp, lambda c, n, t: sn.Sampler(n, k=1, strategy="weighted",
                                                                     weights=["1"] * len(n.submodels))),
                                 "weights", "real numbers"),
    "sampler_weights_a_set": B(_on(mlp, lambda c, n, t: sn.Sampler(n, k=1, strategy="weighted", weights=set(
        range(1, len(n.submodels) + 1)))), "weights", "in the order of the sub-models"),
    "sampler_weights_numpy_bools": B(_on(mlp, lambda c, n, t: sn.Sampler(n, k=1, strategy="weighted", weights=[
        __import__("numpy").True_] * len(n.submodels))), "weights", "real numbers"),
    "sampler_weights_huge_int": B(_on(mlp, lambda c, n, t: sn.Sampler(n, k=1, strategy="weighted", weights=[
        10 ** 400] + [1] * (len(n.submodels) - 1))), "weights", "finite"),
    "sampler_loss_weights_huge_int": B(_on(mlp, lambda c, n, t: sn.Sampler(n, k=2, loss_weights=[
        10 ** 400] + [1] * (len(n.submodels) - 1))), "loss_weights", "finite"),
    "sampler_loss_weights_for_none": B(_on(mlp, lambda c, n, t: sn.Sampler(n, k=2, loss_weights="large")
                                           .loss_weights_for(None)), "loss_weights_for", "None"),
    "sampler_state_submodels_none": B(_on(mlp, lambda c, n, t: (lambda s: s.load_state_dict(
        {**s.state_dict(), "submodels": None}))(sn.Sampler(n, k=1))), "sampler state", "NoneType"),
    "distill_temperature_huge_int": B(_on(mlp, lambda c, n, t: sn.Distill(temperature=10 ** 400)), "temperature"),
    "accumulate_weights_strings": B(_on(mlp, lambda c, n, t: sn.accumulate(n, [n.smallest, n.largest], closure(
        c, lambda y: y.sum()), weights=["0.5", "0.5"])), "weights", "in the order of the sub-models"),
    "accumulate_weights_learned": B(_on(mlp, lambda c, n, t: sn.accumulate(n, [n.smallest, n.largest], closure(
        c, lambda y: y.sum()), weights=list(torch.ones(2, requires_grad=True).unbind()))), "weights",
        "not learned", "require grad"),
    "accumulate_weights_generator": B(_on(mlp, lambda c, n, t: sn.accumulate(n, [n.smallest, n.largest], closure(
        c, lambda y: y.sum()), weights=(w for w in [0.5, -1.0]))), "weights", "finite non-negative"),
    "accumulate_weights_a_set": B(_on(mlp, lambda c, n, t: sn.accumulate(n, [n.smallest, n.largest], closure(
        c, lambda y: y.sum()), weights={0.25, 0.75})), "weights", "{"),
    "fit_device_meta": B(_on(mlp, lambda c, n, t: _fit(c, n, [(c.example, c.example)], device="meta")),
                         "device", "meta"),
    "fit_device_not_here": B(_on(mlp, lambda c, n, t: _fit(c, n, [(c.example, c.example)], device="cuda:9")),
                             "device", "cuda:9", "not available"),
    "fit_progress_tensor": B(_on(mlp, lambda c, n, t: _fit(c, n, [(c.example, c.example)], progress=torch.tensor(
        [1, 0]))), "progress=", "True or False"),
    "fit_eval_set_bad_second_batch": B(_on(mlp, lambda c, n, t: _fit(c, n, [(c.example, c.example)] * 3, lr=0.1,
                                                                     eval_data=[(c.example, _labels(c)), (c.example,)],
                                                                     loss_fn=lambda o, y: o.square().mean())),
                                       "eval_data", "1 items"),
    "load_strict_string": B(lambda tmp: (lambda c, n, p: (c, n, lambda: sn.load(n, p, strict="no")))(*_saved(tmp)),
                            "load(strict=...)", "'no'"),
    "load_verify_tensor": B(lambda tmp: (lambda c, n, p: (c, n, lambda: sn.load(c.model, p, verify=torch.ones(
        2))))(*_saved(tmp)), "load(verify=...)", "Tensor"),
    "sort_units_negative_atol": B(_on(mlp, lambda c, n, t: _sort_units()(n, example=c.example, atol=-1.0)),
                                  "atol=", "-1.0"),
    "sort_units_data_an_int": B(_on(mlp, lambda c, n, t: _sort_units()(n, "taylor", example=c.example, data=3)),
                                "data=", "int"),
    "discover_ratios_a_string": B(_fresh(lambda c, t: sn.discover(c.model, c.example, ratios="1")), "ratios", "'1'"),
    "distributed_save_not_a_nest": B(_fresh(lambda c, t: __import__("sortednet.distributed").distributed.save(
        c.model, os.path.join(t, "m.safetensors"))), "needs a Nest", "MLP"),
    "discover_heads_a_string": B(_fresh(lambda c, t: sn.discover(c.model, c.example, heads="no")), "heads=", "'no'"),
}


def _labels(c):
    return torch.zeros(len(c.example), dtype=torch.long)


def _sort_units():
    from sortednet.importance import sort_units

    return sort_units


@pytest.mark.parametrize("name", sorted(TABLE))
def test_bad_input_names_fault_and_changes_nothing(name, tmp_path):
    build, needles = TABLE[name]
    c, nest, action = build(str(tmp_path))
    before, out = snapshot(c.model), run(c.model, c.example)
    active = None if nest is None else nest.active
    with pytest.raises(sn.SortedNetError) as err:
        action()
    msg = str(err.value)
    for needle in needles:
        assert needle in msg, f"{needle!r} not in {msg!r}"
    assert_unchanged(c.model, before)
    assert torch.equal(run(c.model, c.example), out)
    if nest is not None and nest._alive:
        assert nest.active == active


def test_table_has_forty_more_faults():
    assert len(TABLE) >= 40


def test_huge_int_budget_is_unlimited():
    """A budget too large for a float is accepted as unlimited (like inf), not an OverflowError."""
    c, nest = mlp()
    assert nest.pick(params=10 ** 400) == nest.pick(params=float("inf")) == nest.largest


def test_incomplete_width_still_runs_when_shapes_agree():
    """The wiring hint is raised only for a failing forward; a working one is untouched."""
    c = FAMILIES["mlp"]()
    nest = sn.wrap(c.model, Width("o", [2, 5], out="fc3"))   # the model's output width nests: legitimate
    with nest.use("o=2"):
        assert nest(c.example).shape == (6, 2)


@pytest.mark.parametrize("call", ["inplace_grad", "submodels", "plain", "merge"])
def test_yes_no_options_and_the_submodel_list_refuse_values_of_another_type(call):
    """A type fuzzer: ``wrap(inplace_grad='')`` / ``export(plain=2.5)`` / ``unwrap(merge=tensor)`` were read by
    their truth (a tensor raised deep inside), ``wrap(submodels=True)`` raised a bare "not iterable"."""
    import numpy as np

    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    dim = lambda: sn.Width("h", [4, 8], out="0", inp="2")  # noqa: E731
    if call in ("inplace_grad", "submodels"):
        for bad in ("", 2.5, torch.tensor([4, 8])) if call == "inplace_grad" else (True, 2.5, object()):
            with pytest.raises(sn.SortedNetError, match=f"{call}"):
                sn.wrap(m, dim(), **{call: bad})
            assert type(m[0]) is torch.nn.Linear
        sn.wrap(m, dim(), inplace_grad=np.bool_(False)).unwrap()
        return
    nest = sn.wrap(m, dim())
    with pytest.raises(sn.SortedNetError, match=f"{call}=...\\) takes True or False"):
        nest.export(plain=2.5) if call == "plain" else nest.unwrap(merge=torch.tensor([4, 8]))
    assert type(m[0]) is not torch.nn.Linear  # still wrapped
    if call == "merge":  # unwrap_copy(merge="no") merged (a non-empty string is true)
        copy = __import__("copy").deepcopy(m)
        for bad in ("no", 0, None):
            with pytest.raises(sn.SortedNetError, match="unwrap_copy\\(merge=...\\) takes True or False"):
                nest.unwrap_copy(copy, merge=bad)
            assert type(copy[0]) is not torch.nn.Linear
        assert type(nest.unwrap_copy(copy, merge=False)[0]) is torch.nn.Linear


@pytest.mark.parametrize("fails", ["open", "write"])
def test_save_turns_an_os_error_into_a_named_refusal_and_keeps_the_old_file(fails, tmp_path, monkeypatch):
    """A folder sortednet may not write in raised a raw FileNotFoundError / PermissionError naming only the
    hidden temporary file; a full disk a raw OSError. Now: a SortedNetError naming the path, the old checkpoint
    intact and no temporary file left."""
    import errno

    c, nest = mlp()
    path = str(tmp_path / "n.safetensors")
    sn.save(nest, path)
    old = open(path, "rb").read()
    if fails == "open":
        def refuse(*a, **k):
            raise PermissionError(errno.EACCES, "Permission denied")
        monkeypatch.setattr(os, "open", refuse)
    else:
        real = os.fsync

        def full(fd):
            real(fd)
            raise OSError(errno.ENOSPC, "No space left on device")
        monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(sn.SortedNetError, match="Permission denied" if fails == "open" else "No space left") as e:
        sn.save(nest, path)
    monkeypatch.undo()
    assert "n.safetensors" in str(e.value)
    assert open(path, "rb").read() == old and os.listdir(tmp_path) == ["n.safetensors"]


def test_save_keeps_an_existing_files_permissions_and_writes_through_a_link(tmp_path, monkeypatch):
    """Saving over a 0600 checkpoint left a 0644 one (readable by others); saving to a "latest" symbolic link
    replaced the link by a file, the checkpoint it pointed to keeping the old weights. Both now behave as
    torch.save does. A failure that is not an OSError (a tensor that cannot be read back) is named too."""
    import stat

    c, nest = mlp()
    real = tmp_path / "ckpt-1.safetensors"
    sn.save(nest, str(real))
    os.chmod(real, 0o600)
    link = tmp_path / "latest.safetensors"
    os.symlink(real.name, link)
    with torch.no_grad():
        next(c.model.parameters()).add_(1.0)
    sn.save(nest, str(link))
    assert os.path.islink(link) and stat.S_IMODE(os.stat(real).st_mode) == 0o600
    assert sorted(os.listdir(tmp_path)) == ["ckpt-1.safetensors", "latest.safetensors"]
    fresh = FAMILIES["mlp"]()
    loaded = sn.load(fresh.model, str(real))
    assert all(torch.equal(a, b) for a, b in zip(fresh.model.state_dict().values(), c.model.state_dict().values()))
    loaded.unwrap()
    old = real.read_bytes()

    def unreadable(t):
        raise RuntimeError("device-side copy failed")
    monkeypatch.setattr(ck, "_raw", unreadable)
    with pytest.raises(sn.SortedNetError, match="RuntimeError: device-side copy failed.*unchanged"):
        sn.save(nest, str(link))
    monkeypatch.undo()
    assert real.read_bytes() == old and sorted(os.listdir(tmp_path)) == ["ckpt-1.safetensors", "latest.safetensors"]


def test_load_failing_after_every_tensor_says_the_weights_loaded(tmp_path, monkeypatch):
    """Restoring the calibration / profile failed after every weight was copied: the message said 'stopped after
    N of N tensors ... some of the checkpoint's values and some of its own', which was not so."""
    from sortednet.nest import Nest

    c, nest, path = _saved(str(tmp_path))

    def broken(self, extra):
        raise OSError("simulated")
    monkeypatch.setattr(Nest, "_load_extra_state", broken)
    with pytest.raises(sn.SortedNetError, match=r"all \d+ tensors were copied, then restoring"):
        sn.load(FAMILIES["mlp"](seed=7).model, path)


@pytest.mark.parametrize("fault", [OSError, KeyboardInterrupt])
def test_load_interrupted_while_copying_says_so_and_can_run_again(fault, tmp_path, monkeypatch):
    """Past every check, a read error of the disk or Ctrl-C while weights are copied raised bare and left a fresh
    model wrapped (a second sn.load refused it as 'already wrapped'), with nothing saying it was half loaded."""
    import sortednet.checkpoint as ck

    c, nest, path = _saved(str(tmp_path))
    fresh = FAMILIES["mlp"](seed=7).model
    classes = [type(m) for m in fresh.modules()]
    real, calls = ck.Container.copy_into, []

    def flaky(self, name, targets):
        calls.append(name)
        if len(calls) == 3:
            raise fault("simulated")
        return real(self, name, targets)
    monkeypatch.setattr(ck.Container, "copy_into", flaky)
    with pytest.raises(sn.SortedNetError if fault is OSError else KeyboardInterrupt) as e:
        sn.load(fresh, path)
    text = str(e.value) + "".join(getattr(e.value, "__notes__", []))
    assert "loading stopped after 2 of" in text and "load again" in text
    assert [type(m) for m in fresh.modules()] == classes  # unwrapped: it can be loaded again
    monkeypatch.undo()
    again = sn.load(fresh, path)
    with torch.no_grad():
        for sub in nest.submodels:
            with again.use(sub), nest.use(sub):
                assert torch.equal(again(c.example), nest(c.example))


class _Layer(torch.nn.Module):
    def forward(self, x):
        return x


class _NoFull(sn.Slicer):
    roles = ("out",)

    def value(self, m, name):
        return None


class _NeedsArgs(sn.Slicer):
    def __init__(self, scale):
        self.scale = scale

    def full(self, m, role):
        return 1


class _RoleTypo(sn.Slicer):  # a views role spelled wrong: the tensor was never cut (a raw shape error later)
    roles = ("norm",)
    attrs = ("gamma",)
    views = {"gamma": ((0, "nrom"),)}

    def full(self, m, role):
        return 1


class _NoValue(sn.Slicer):  # 'scale' served by neither a views entry nor value(): a bare NotImplementedError
    roles = ("out",)
    attrs = ("weight", "scale")
    views = {"weight": ((0, "out"),)}

    def full(self, m, role):
        return 1


class _NoStaticValue(sn.Slicer):  # 'dim' in static, which value() computes: none defined (was let through)
    roles = ("norm",)
    attrs = ("weight", "dim")
    views = {"weight": ((0, "norm"),)}
    static = ("dim",)

    def full(self, m, role):
        return 1


@pytest.mark.parametrize("register, match", [
    (lambda: sn.slicer(_Layer)(_RoleTypo), r"slicer _RoleTypo: views\['gamma'\] cuts by role 'nrom', which is not "
                                           r"one of its roles \('norm',\)"),
    (lambda: sn.slicer(_Layer)(_NoValue), r"slicer _NoValue: attrs \['scale'\] have no views entry and the slicer "
                                          r"defines no value"),
    (lambda: sn.slicer(_Layer)(_NoStaticValue), r"slicer _NoStaticValue: attrs \['dim'\] are in static, which "
                                                r"the slicer's value\(m, name\) computes once per size.*add a value"),
    (lambda: sn.slicer(), r"takes the nn.Module classes .* got none"),
    (lambda: sn.slicer(int), r"<class 'int'> is not an nn.Module class"),
    (lambda: sn.slicer(torch.nn.Linear(2, 2)), r"Linear\(in_features=2.* is not an nn.Module class"),
    (lambda: sn.slicer(_Layer)(type("NotASlicer", (), {})), r"decorates a subclass of sn.Slicer, not"),
    (lambda: sn.slicer(_Layer)(_NoFull), r"slicer _NoFull: full\(m, role\) is not defined"),
    (lambda: sn.slicer(_Layer)(_NeedsArgs), r"slicer _NeedsArgs: it is made once with no arguments"),
])
def test_a_slicer_registration_it_cannot_use_is_refused_at_once(register, match):
    """``@sn.slicer`` took anything: an int or a module instance as the type (``slicer_for(42)`` then answered),
    a class that is no Slicer (a raw AttributeError at the next wrap), one without ``full()`` (a bare
    NotImplementedError at wrap) or one that needs arguments (a raw TypeError). Refused when registered, and
    nothing is registered."""
    with pytest.raises(sn.SortedNetError, match=match):
        register()
    assert sn.slicer_for(_Layer()) is None


def test_numpy_integers_are_chunk_counts_as_they_are_sizes():
    np = pytest.importorskip("numpy")
    assert sn.Width("h", [4, 8], out="a", chunks=np.int64(2)).chunks == {"a": 2}
    assert sn.Width("h", [4, 8], out="a", chunks={"a": np.int32(3)}).chunks == {"a": 3}


def test_load_stopped_by_a_ctrl_c_at_any_point_of_its_own_code_is_all_or_nothing_or_says_so(tmp_path):
    """A Ctrl-C anywhere in sn.load's own code into a fresh model: the model is plain again (it can be loaded
    again), holding its own weights unless the interrupt's note says some were copied. Was: wrapped, not loaded,
    no note, as the wrap returned. A Ctrl-C anywhere in saving leaves the old file and no temporary."""
    from models import interrupted_between_bytecodes
    from sortednet.checkpoint import write
    from sortednet.io import load

    c, nest, path = _saved(str(tmp_path))
    own = {k: v.clone() for k, v in FAMILIES["mlp"](seed=7).model.state_dict().items()}
    classes = [type(m) for m in FAMILIES["mlp"](seed=7).model.modules()]
    n, fired = 0, True
    while fired:
        n += 1
        fresh, notes = FAMILIES["mlp"](seed=7).model, []

        def call(fresh=fresh, notes=notes):
            try:
                sn.load(fresh, path)
            except KeyboardInterrupt as e:
                notes.extend(getattr(e, "__notes__", []))
                raise

        fired = interrupted_between_bytecodes(n, call, load)
        if not fired:
            break
        if [type(m) for m in fresh.modules()] != classes:  # stopped as load returned: wrapped and loaded in full
            done = sn.Nest.of(fresh)
            with torch.no_grad(), done.use(nest.smallest), nest.use(nest.smallest):
                assert torch.equal(done(c.example), nest(c.example)), f"point {n}: wrapped, not loaded"
            done.unwrap()
            continue
        if not any("tensors had been copied" in t or "tensors were copied" in t for t in notes):
            for k, v in fresh.state_dict().items():
                assert torch.equal(v, own[k]), f"point {n}: {k} changed, and no note says so"
        with torch.no_grad():
            again = sn.load(fresh, path)
            for sub in nest.submodels[:2]:
                with again.use(sub), nest.use(sub):
                    assert torch.equal(again(c.example), nest(c.example)), f"point {n}"
        again.unwrap()
    assert n > 20, f"only {n - 1} points reached"

    before = open(path, "rb").read()
    n, fired = 0, True
    while fired:
        n += 1
        fired = interrupted_between_bytecodes(n, lambda: sn.save(nest, path), write)
        assert sorted(os.listdir(tmp_path)) == ["n.safetensors"], f"point {n}: {os.listdir(tmp_path)}"
        assert open(path, "rb").read() == before, f"point {n}"
    assert n > 10, f"only {n - 1} points reached"


def test_a_subclass_of_a_built_in_slicer_may_narrow_its_roles():
    """The registration check of views roles (regression): an inherited entry cutting by a role the subclass
    leaves out is never bound, and was accepted before the check."""
    from sortednet.slicers.linear import LinearSlicer

    class OutLinear(torch.nn.Linear):
        pass

    @sn.slicer(OutLinear)
    class OutOnly(LinearSlicer):
        roles = ("out",)

    torch.manual_seed(0)
    m = torch.nn.Sequential(OutLinear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))
    x = torch.randn(3, 8)
    nest = sn.wrap(m, sn.Width("h", [4, 16], out="0", inp="2"), example=x)
    small = nest.export("h=4")
    with nest.use("h=4"):
        torch.testing.assert_close(small(x), m(x))
    assert small[0].weight.shape == (4, 8)


def test_a_views_only_slicer_reads_an_absent_bias_as_none_and_a_plain_attribute_is_named():
    """A slicer with ``views`` and no ``value()`` on a layer whose bias is registered as None (``bias=False``) was
    refused with an empty ``NotImplementedError: .`` (the absent tensor went to value()); a plain tensor attribute
    in views was blamed on a weight_norm hook the model does not have."""
    class StoredTransposed(torch.nn.Module):  # (in, out) weight, no bias
        def __init__(self, i, o):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.randn(i, o))
            self.register_parameter("bias", None)
            self.freq = torch.linspace(0, 1, o)  # (a plain tensor, no parameter or buffer)

        def forward(self, x):
            y = x @ self.weight
            return y if self.bias is None else y + self.bias

    @sn.slicer(StoredTransposed)
    class ViewsOnly(sn.Slicer):
        roles, attrs = ("out", "inp"), ("weight", "bias")
        views = {"weight": ((0, "inp"), (1, "out")), "bias": ((0, "out"),)}

        def full(self, m, role):
            return m._parameters["weight"].shape[1 if role == "out" else 0]

    torch.manual_seed(0)
    m = torch.nn.Sequential(StoredTransposed(6, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))
    x = torch.randn(3, 6)
    nest = sn.wrap(m, sn.Width("h", [4, 16], out="0", inp="2"), example=x)
    with torch.no_grad(), nest.use("h=4"):
        want = torch.relu(x @ m[0].weight) @ m[2].weight.T + m[2].bias  # (the live weights, cut to 4)
        torch.testing.assert_close(m(x), want)
        torch.testing.assert_close(nest.export("h=4")(x), want)
    nest.unwrap()

    class Freq(StoredTransposed):
        pass

    @sn.slicer(Freq)
    class WithFreq(ViewsOnly):
        attrs = ("weight", "bias", "freq")
        views = {**ViewsOnly.views, "freq": ((0, "out"),)}

    m = torch.nn.Sequential(Freq(6, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))
    before = snapshot(m)
    with pytest.raises(sn.SortedNetError, match=r"WithFreq declares 'freq' in views, but the module has no parameter "
                                                 r"or buffer of that name, only a plain tensor attribute"):
        sn.wrap(m, sn.Width("h", [4, 16], out="0", inp="2"))
    assert_unchanged(m, before)


@pytest.mark.parametrize("layer", ["linear", "layernorm", "lora", "batchnorm"])
def test_a_tensor_assigned_where_the_wrapped_model_had_none_is_refused(layer):
    """A bias assigned after wrap to a layer wrapped with ``bias=False`` was taken unchecked: one of 32 values
    for 16 outputs was cut to its first 16 in silence (unwrapped, PyTorch refuses it), one of 4 raised a raw
    error at every read, and beside LoRA adapters a trainable one trained (documented as refused); cost, export
    and save refused it only later ("parameters added")."""
    torch.manual_seed(0)
    x = torch.randn(3, 8)
    if layer == "layernorm":
        m = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.LayerNorm(16, bias=False), torch.nn.Linear(16, 4))
        nest, where = sn.wrap(m, sn.Width("w", [4, 16], out="0", norm="1", inp="2")), m[1]
    elif layer == "lora":
        m = torch.nn.Sequential(torch.nn.Linear(8, 16, bias=False), torch.nn.ReLU(), torch.nn.Linear(16, 4))
        nest, where = sn.wrap(m, sn.Rank("r", [2, 4], targets="0", mode="lora")), m[0]
    elif layer == "batchnorm":  # (no running statistics: buffers registered as None)
        m = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.BatchNorm1d(16, track_running_stats=False),
                                torch.nn.Linear(16, 4))
        nest, where = sn.wrap(m, sn.Width("w", [4, 16], out="0", norm="1", inp="2")), m[1]
    else:
        m = torch.nn.Sequential(torch.nn.Linear(8, 16, bias=False), torch.nn.ReLU(), torch.nn.Linear(16, 4))
        nest, where = sn.wrap(m, sn.Width("w", [4, 16], out="0", inp="2")), m[0]
    m.eval()
    before = snapshot(m)
    for n in (16, 32):
        if layer == "batchnorm":
            with pytest.raises(sn.SortedNetError, match=r"running_mean was None when the model was wrapped: a buffer"):
                where.running_mean = torch.zeros(n)
            assert where._buffers["running_mean"] is None
            continue
        with pytest.raises(sn.SortedNetError, match=r"bias was None when the model was wrapped: a parameter"):
            where.bias = torch.nn.Parameter(torch.zeros(n))
        assert where._parameters["bias"] is None
    assert_unchanged(m, before)
    with torch.no_grad():
        torch.testing.assert_close(nest.export(nest.largest)(x), m(x))


def test_a_none_views_tensor_reads_none_whatever_value_serves_and_sliced_buffers_stay_buffers():
    """A views tensor registered as None went to the slicer's value() at each read: one serving only its static
    sizes made the bias read an int (the full model 4.7 off its own output before wrap); a subclass of a built-in
    slicer with an optional views tensor read the same. A sliced buffer set to None was accepted (cost refused it
    later), and a Parameter assigned in place of one was refused only after PyTorch had removed the buffer (no
    running statistics left: a raw error at the next forward)."""
    from sortednet.slicers.embedding import EmbeddingSlicer

    class MyLin(torch.nn.Module):
        def __init__(self, i, o):
            super().__init__()
            self.weight, self.n_out = torch.nn.Parameter(torch.randn(o, i)), o
            self.register_parameter("bias", None)

        def forward(self, x):
            y = x @ self.weight.T
            return y if self.bias is None else y + self.bias

    @sn.slicer(MyLin)
    class Static(sn.Slicer):
        roles, attrs, static = ("out", "inp"), ("weight", "bias", "n_out"), ("n_out",)
        views = {"weight": ((0, "out"), (1, "inp")), "bias": ((0, "out"),)}

        def full(self, m, role):
            return m._parameters["weight"].shape[0 if role == "out" else 1]

        def value(self, m, name):  # (serves the static size only)
            return self.features(m, "out", m.__dict__["n_out"])

    class ScaledEmb(torch.nn.Embedding):
        def __init__(self, *a):
            super().__init__(*a)
            self.register_parameter("scale", None)

        def forward(self, i):
            y = super().forward(i)
            return y if self.scale is None else y * self.scale

    @sn.slicer(ScaledEmb)
    class ScaledSlicer(EmbeddingSlicer):
        attrs = (*EmbeddingSlicer.attrs, "scale")
        views = {**EmbeddingSlicer.views, "scale": ((0, "out"),)}

    torch.manual_seed(0)
    for first, x in ((MyLin(4, 8), torch.randn(3, 4)), (ScaledEmb(10, 8), torch.randint(0, 10, (3,)))):
        m = torch.nn.Sequential(first, torch.nn.ReLU(), torch.nn.Linear(8, 2))
        with torch.no_grad():
            want = m(x)
        nest = sn.wrap(m, sn.Width("h", [4, 8], out="0", inp="2"), example=x)
        with torch.no_grad():
            torch.testing.assert_close(m(x), want)
            with nest.use("h=4"):
                assert getattr(m[0], "bias" if isinstance(first, MyLin) else "scale") is None
                torch.testing.assert_close(nest.export("h=4")(x), m(x))
        nest.unwrap()
    m = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.Linear(8, 2))
    nest = sn.wrap(m, sn.Width("h", [4, 8], out="0", norm="1", inp="2"))
    before = snapshot(m)
    with pytest.raises(sn.SortedNetError, match=r"1\.running_mean is sliced by sortednet and cannot be removed"):
        m[1].running_mean = None
    with pytest.raises(sn.SortedNetError, match=r"1\.running_mean is a buffer sortednet slices: a Parameter"):
        m[1].running_mean = torch.nn.Parameter(torch.zeros(8))
    assert isinstance(m[1]._buffers["running_mean"], torch.Tensor) and "running_mean" not in m[1]._parameters
    assert_unchanged(m, before)
    m[1].running_mean = torch.ones(8)  # (a tensor of its shape: taken, as before)
    m.eval()
    with torch.no_grad():
        m(torch.randn(3, 4))


def test_sizes_as_a_string_and_a_block_put_in_a_depth_list_through_modules_are_refused(tmp_path):
    """``Width("h", "64")`` was split into characters ("size '6' is not an int"); a parameter-free block put in a
    Depth list through ``_modules`` was refused by the forward but taken by cost, pick, export and save (an
    export of 4 blocks for a model that then ran 5)."""
    with pytest.raises(sn.SortedNetError, match=r"sizes must be a sequence of ints \(a list\), got str '64'"):
        sn.Width("h", "64", out="0")
    torch.manual_seed(0)

    class Stack(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = torch.nn.ModuleList(torch.nn.Linear(4, 4) for _ in range(4))

        def forward(self, x):
            for b in self.blocks:
                x = torch.relu(b(x))
            return x

    m = Stack()
    nest = sn.wrap(m, sn.Depth("depth", [1, 2, 4], layers="blocks"))
    m.blocks._modules["4"] = torch.nn.Identity()
    for call in (lambda: nest.cost(nest.largest), lambda: nest.pick(params=10 ** 6), lambda: nest.export("depth=2"),
                 lambda: sn.save(nest, str(tmp_path / "n.safetensors"))):
        with pytest.raises(sn.SortedNetError, match=r"the model changed after wrap: 'blocks' holds 5 modules, 4 when"):
            call()
    del m.blocks._modules["4"]
    assert nest.cost("depth=2") == 40


def test_an_index_past_the_blocks_of_a_shallower_depth_says_so():
    """``for i in range(self.n_layers): self.blocks[i](x)`` under depth 1 raised a bare ``IndexError: index 1 is
    out of range``; it says the depth in force now, and is still an IndexError."""
    class Counted(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks, self.n_layers = torch.nn.ModuleList(torch.nn.Linear(4, 4) for _ in range(4)), 4

        def forward(self, x):
            for i in range(self.n_layers):
                x = self.blocks[i](x)
            return x

    m = Counted()
    nest = sn.wrap(m, sn.Depth("depth", [1, 4], layers="blocks"))
    with nest.use("depth=1"), pytest.raises(IndexError, match=r"'blocks' holds 1 of its 4 blocks under the depth"):
        m(torch.randn(2, 4))
    with pytest.raises(IndexError, match=r"index 7 is out of range$"):  # (past all of them: PyTorch's own)
        m.blocks[7]


def test_save_refuses_a_path_that_is_no_regular_file_and_leaves_it_as_it_was(tmp_path):
    model, nest = mlp()
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    with pytest.raises(sn.SortedNetError, match="not a regular file"):
        sn.save(nest, fifo)
    assert os.path.exists(fifo) and not os.path.isfile(fifo)
    link = tmp_path / "latest"
    os.symlink(fifo, link)  # (through a link too)
    with pytest.raises(sn.SortedNetError, match="not a regular file"):
        sn.save(nest, link)
    assert not os.path.isfile(fifo) and sorted(os.listdir(tmp_path)) == ["latest", "pipe"]
    target = tmp_path / "ckpt.safetensors"  # (a link to a regular file is written through)
    target.write_bytes(b"")
    os.unlink(link)
    os.symlink(target, link)
    sn.save(nest, link)
    assert os.path.islink(link) and sn.load(FAMILIES["mlp"]().model, target).submodels == nest.submodels


@pytest.mark.parametrize("option", [dict(count_attrs=5), dict(qkv=5), dict(per_head=5), dict(whole=3),
                                    dict(qkv=[["q"], "k", "v"]), dict(o=3), dict(qkv="")])
def test_heads_options_of_the_wrong_type_are_pattern_errors_naming_the_option(option):
    (name,) = option
    with pytest.raises(sn.PatternError, match=f"Heads 'h': {name}= takes"):
        sn.Heads("h", [2, 4], attn="attn", **option)


def test_heads_takes_one_count_attribute_as_a_string():
    assert sn.Heads("h", [2, 4], attn="attn", count_attrs="num_heads").count_attrs == ("num_heads",)


@pytest.mark.parametrize("pattern", [b"0", bytearray(b"0"), {"0": 1}])
def test_a_pattern_of_bytes_or_a_mapping_is_refused_as_it_was_given(pattern):
    with pytest.raises(sn.PatternError, match=r"must be a string or a list of strings.*got " + repr(pattern)[:6]
                       .replace("(", r"\(").replace("{", r"\{")):
        Width("h", [4, 8], out=pattern, inp="2")


def test_profile_refuses_a_score_that_is_not_callable_before_measuring():
    case, nest = mlp()
    with pytest.raises(sn.SortedNetError, match="takes a callable score"):
        nest.profile(case.example, score="acc", progress=False)
    assert nest._profile is None


def test_by_ratio_refuses_a_dimension_name_given_twice():
    dims = [Width("a", [4, 8], out="0", inp="2"), Width("a", [2, 16], out="2", inp="4")]
    with pytest.raises(sn.SortedNetError, match=r"names \['a'\] are given twice"):
        sn.by_ratio(dims, [0.5, 1.0])


class _Masked(torch.nn.Module):
    """A layer keeping a per-unit mask as a plain tensor attribute (neither parameter nor buffer)."""

    def __init__(self, i, o):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(o, i))
        self.mask = (torch.rand(o) > 0.5).float()

    def forward(self, x):
        y = torch.nn.functional.linear(x, self.weight)
        return y if self.mask is None else y * self.mask


@pytest.mark.parametrize("serve", ["take", "none", "first", "by_hand"])
@pytest.mark.parametrize("example", [False, True])
def test_a_plain_tensor_attribute_a_slicer_serves_is_cut_by_take_and_checked_at_the_full_sizes(serve, example):
    """take() cuts a plain tensor attribute as it cuts a parameter (the advice of the views refusal); a value()
    serving it as None or in another shape at the full sizes (the full model itself changed) is refused at
    wrap, as for a parameter, before anything changes."""
    kind = type(f"Masked_{serve}_{example}", (_Masked,), {})

    @sn.slicer(kind)
    class Served(sn.Slicer):
        roles, attrs = ("out", "inp"), ("weight", "mask")

        def full(self, m, role):
            return m._parameters["weight"].shape[0 if role == "out" else 1]

        def value(self, m, name):
            if name == "weight":
                return self.take(m, "weight", [(0, "out"), (1, "inp")])
            if serve == "none":
                return None
            if serve == "first":
                return m.__dict__["mask"][:1]
            if serve == "by_hand":
                return m.__dict__["mask"][: self.features(m, "out", m.__dict__["mask"].shape[0])]
            return self.take(m, "mask", [(0, "out")])

    torch.manual_seed(0)
    m = torch.nn.Sequential(kind(4, 16), torch.nn.Linear(16, 2))
    x = torch.randn(3, 4)
    with torch.no_grad():
        before_out = m(x)
    before = snapshot(m)
    if serve in ("none", "first"):
        with pytest.raises(sn.SortedNetError, match="'mask'"):
            sn.wrap(m, sn.Width("h", [4, 16], out="0", inp="1"), **({"example": x} if example else {}))
        assert_unchanged(m, before)
        assert type(m[0]) is kind and isinstance(m[0].mask, torch.Tensor)
        return
    nest = sn.wrap(m, sn.Width("h", [4, 16], out="0", inp="1"), **({"example": x} if example else {}))
    with torch.no_grad():
        torch.testing.assert_close(m(x), before_out, rtol=0, atol=0)
        with nest.use("h=4"):
            want = (torch.nn.functional.linear(x, m[0].weight) * m[0].__dict__["mask"][:4]) @ m[1].weight.T \
                + m[1].bias
            torch.testing.assert_close(m(x), want)
            torch.testing.assert_close(nest.export("h=4")(x), want)


def test_a_size_mismatch_on_a_slicer_of_ones_own_points_at_its_full():
    kind = type("OverReported", (torch.nn.Linear,), {})

    @sn.slicer(kind)
    class Over(sn.Slicer):
        roles, attrs = ("out", "inp"), ("weight", "bias")

        def full(self, m, role):
            return m._parameters["weight"].shape[0 if role == "out" else 1] + (role == "inp")

        def value(self, m, name):
            axes = [(0, "out"), (1, "inp")] if name == "weight" else [(0, "out")]
            return self.take(m, name, axes)

    m = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), kind(4, 2))
    before = snapshot(m)
    with pytest.raises(sn.SizeError, match=r"Over.full\('inp'\), a slicer of yours, reports another size"):
        sn.wrap(m, sn.Width("a", [2, 4], out="0", inp="2"))
    assert_unchanged(m, before)


def test_save_and_load_with_their_arguments_swapped_say_so(tmp_path):
    case, nest = mlp()
    path = str(tmp_path / "n.safetensors")
    with pytest.raises(sn.SortedNetError, match=r"the arguments are \(nest, path\)"):
        sn.save(path, nest)
    assert not os.path.exists(path)
    sn.save(nest, path)
    with pytest.raises(sn.SortedNetError, match=r"the arguments are \(model, path\)"):
        sn.load(path, FAMILIES["mlp"]().model)
