"""SortedTrainer under DDP (``torchrun --nproc_per_node 2``, gloo, CPU) equals one process.

Transformers' Trainer wraps the model in DDP; its reducer expects a gradient for every parameter it cannot
prove unused (a depth skips blocks) and does not check that the ranks ran the same sub-models. SortedTrainer
runs every backward under ``no_sync`` and all-reduces the gradients once per optimizer step. Every slice here uses
the in-place gradient path (``INPLACE_MIN_NUMEL = 0``). Each optimizer step sees the whole 4-sample
dataset (2 per rank, or 4 in one process), so the two runs must agree whatever the data order.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys

import pytest

pytest.importorskip("transformers")

import torch  # noqa: E402

SRC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src")
STEPS = 3


def train(out_dir: str, world: int, mode: str) -> tuple[dict, list, int]:
    """Train STEPS steps with SortedTrainer (``mode="sorted"``) or a stock Trainer + SubModelCallback."""
    import torch.distributed as dist
    from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

    import sortednet as sn
    import sortednet.slicers as slicers
    from sortednet.integrations import SortedTrainer, SubModelCallback

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=40, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                                         num_attention_heads=4, num_key_value_heads=2, bos_token_id=0,
                                         eos_token_id=0, pad_token_id=0))
    default, slicers.INPLACE_MIN_NUMEL = slicers.INPLACE_MIN_NUMEL, 0  # read by wrap: restored for later tests
    try:
        nest = sn.from_transformers(model, ffn=[16, 32], heads=[2], depth=[1, 2])
    finally:
        slicers.INPLACE_MIN_NUMEL = default
    x = torch.randint(1, 40, (4, 9), generator=torch.Generator().manual_seed(1))
    data = [{"input_ids": row, "labels": row} for row in x]
    args = TrainingArguments(os.path.join(out_dir, mode), max_steps=STEPS, per_device_train_batch_size=4 // world,
                             optim="sgd", learning_rate=0.5, max_grad_norm=0.0, weight_decay=0.0, report_to=[],
                             use_cpu=True, save_strategy="no", disable_tqdm=True, logging_strategy="no", seed=0,
                             ddp_backend="gloo" if world > 1 else None)
    subs = nest.submodels[:-1]  # never the largest: every weight is sliced
    calls = [0]
    all_reduce = dist.all_reduce

    def counting(*a, **k):  # DDP's own reducer does not come through here; sync_gradients does (the rest:
        calls[0] += a[0].numel() > 8  # small agreements of sub-models and flags)
        return all_reduce(*a, **k)

    dist.all_reduce = counting
    try:
        if mode == "sorted":
            trainer = SortedTrainer(model=model, args=args, train_dataset=data, nest=nest,
                                    sampler=sn.Sampler(subs, k=2, strategy="uniform", seed=5))
            trainer.train()
            history = [[str(s) for s in ss] for _, ss in trainer.history]
        else:
            cb = SubModelCallback(nest, sn.Sampler(subs, k=1, strategy="uniform", seed=5))
            Trainer(model=model, args=args, train_dataset=data, callbacks=[cb]).train()
            history = [[str(s)] for _, s in cb.history]
    finally:
        dist.all_reduce = all_reduce
    return model.state_dict(), history, calls[0]


def faults(out_dir: str) -> dict:
    """Faults of one rank that must raise on every rank, or be agreed, instead of hanging the other."""
    import torch.distributed as dist
    from transformers import (
        BertConfig,
        BertForSequenceClassification,
        LlamaConfig,
        LlamaForCausalLM,
        Trainer,
        TrainingArguments,
    )

    import sortednet as sn
    from sortednet.integrations import SortedTrainer, SubModelCallback

    rank, out = dist.get_rank(), {}
    args = dict(max_steps=2, per_device_train_batch_size=2, optim="sgd", learning_rate=0.1, report_to=[],
                use_cpu=True, save_strategy="no", disable_tqdm=True, logging_strategy="no", seed=0,
                ddp_backend="gloo")
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=40, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                                         num_attention_heads=4, num_key_value_heads=2))
    nest = sn.from_transformers(model, ffn=[16, 32], depth=[1, 2])
    x = torch.randint(1, 40, (4, 9), generator=torch.Generator().manual_seed(1))
    trainer = SortedTrainer(model=model, args=TrainingArguments(os.path.join(out_dir, "seed"), **args),
                            train_dataset=[{"input_ids": r, "labels": r} for r in x], nest=nest,
                            sampler=sn.Sampler(nest.submodels, k=2, strategy="uniform", seed=5 + rank))
    try:  # a sampler seeded per rank: the gradients of different sub-models would be averaged
        trainer.train()
        out["seed_per_rank"] = "accepted"
    except sn.SortedNetError as e:
        out["seed_per_rank"] = str(e)

    class BadOnOne:  # a draw refused on rank 1 only (a sub-model the nest does not have): rank 0 waited in its
        def draw(self, step):  # next collective until rank 1's process died, then failed with gloo's raw error
            return ["ffn=99,depth=1"] if rank == 1 else [nest.smallest]

    trainer = SortedTrainer(model=model, args=TrainingArguments(os.path.join(out_dir, "bad"), **args),
                            train_dataset=[{"input_ids": r, "labels": r} for r in x], nest=nest, sampler=BadOnOne())
    try:
        trainer.train()
        out["refused_on_one_rank"] = "accepted"
    except sn.SortedNetError as e:
        out["refused_on_one_rank"] = str(e)
    torch.manual_seed(0)  # the same sub-model names slicing other modules on one rank: two networks' gradients
    model = LlamaForCausalLM(LlamaConfig(vocab_size=40, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                                         num_attention_heads=4, num_key_value_heads=2))  # averaged, in silence
    layers = ["0", "1", "2"] if rank == 0 else ["0"]
    nest = sn.wrap(model, sn.Width("ffn", [16, 48], out=[f"model.layers.{i}.mlp.{p}" for i in layers
                                                         for p in ("gate_proj", "up_proj")],
                                   inp=[f"model.layers.{i}.mlp.down_proj" for i in layers]))
    trainer = SortedTrainer(model=model, args=TrainingArguments(os.path.join(out_dir, "nest"), **args),
                            train_dataset=[{"input_ids": r, "labels": r} for r in x], nest=nest,
                            sampler=sn.Sampler([nest.smallest], k=1, seed=0))
    try:
        trainer.train()
        out["nest_per_rank"] = "accepted"
    except sn.SortedNetError as e:
        out["nest_per_rank"] = str(e)
    torch.manual_seed(0)
    bert = BertForSequenceClassification(BertConfig(vocab_size=40, hidden_size=32, num_hidden_layers=2,
                                                    num_attention_heads=4, intermediate_size=48, num_labels=3))
    nest = sn.from_transformers(bert, ffn=[24])
    data = [{"input_ids": r, "labels": torch.tensor(1 if i == 0 else -100)} for i, r in enumerate(x)]
    trainer = SortedTrainer(model=bert, args=TrainingArguments(os.path.join(out_dir, "labels"), **args,
                                                               gradient_accumulation_steps=1),
                            train_dataset=data, nest=nest)
    try:  # one rank's first micro-batch has no label: it could not tell whether the loss takes
        trainer.train()  # num_items_in_batch, and counting them alone (a collective) hung the other rank
        out["no_label_on_one_rank"] = ("ok", trainer.model_accepts_loss_kwargs)
    except Exception as e:  # noqa: BLE001  (recorded)
        out["no_label_on_one_rank"] = (f"{type(e).__name__}: {e}", None)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=40, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                                         num_attention_heads=4, num_key_value_heads=2))
    nest = sn.from_transformers(model, ffn=[16, 32], depth=[1, 2])
    shallow = [s for s in nest.submodels if s["depth"] < 3]
    cb = SubModelCallback(nest, sn.Sampler(shallow, k=1, strategy="uniform", seed=5))
    trainer = Trainer(model=model, args=TrainingArguments(os.path.join(out_dir, "unused"), **args,
                                                          ddp_find_unused_parameters=False),
                      train_dataset=[{"input_ids": r, "labels": r} for r in x], callbacks=[cb])
    try:  # DDP's reducer waited for the skipped blocks: part of the step averaged, DDP's raw error a step later
        trainer.train()
        out["callback_find_unused_false"] = "accepted"
    except sn.SortedNetError as e:
        out["callback_find_unused_false"] = str(e)
    every: list = [None] * dist.get_world_size()
    dist.all_gather_object(every, out)
    return every


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_sorted_trainer_under_ddp_equals_one_process(tmp_path):
    env = {**os.environ, "PYTHONPATH": SRC, "TRANSFORMERS_VERBOSITY": "error", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), __file__, str(tmp_path)]
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                          start_new_session=True) as p:  # its own process group: a hang kills both ranks
        try:
            _, err = p.communicate(timeout=240)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            raise
    proc = subprocess.CompletedProcess(cmd, p.returncode, "", err)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ddp = torch.load(tmp_path / "state.pt")
    for mode in ("sorted", "callback"):
        ref, history, calls = train(str(tmp_path / "one"), 1, mode)
        assert ddp[mode]["history"] == history
        assert "ffn=48,heads=4,depth=3" not in str(history)
        for k, v in ref.items():
            torch.testing.assert_close(ddp[mode]["state"][k], v, atol=1e-5, rtol=0, msg=lambda m, k=k: f"{k}: {m}")
    assert ddp["sorted"]["calls"] == STEPS  # one gradient all-reduce per optimizer step (the model is one bucket)
    for i, rank in enumerate(ddp["faults"]):  # every rank raised (or the run would have hung), and agreed
        assert "ranks disagree on the sub-models (and the nest) of step 0" in rank["seed_per_rank"], rank
        assert "ranks disagree" in rank["nest_per_rank"] and "nest=" in rank["nest_per_rank"], rank
        assert "99" in rank["refused_on_one_rank"] and ("rank 1 refused" in rank["refused_on_one_rank"]) == (i == 0)
        assert rank["no_label_on_one_rank"] == ("ok", False), rank
        msg = rank["callback_find_unused_false"]
        assert "SubModelCallback" in msg and "ddp_find_unused_parameters=True" in msg, msg


if __name__ == "__main__":  # one rank of the torchrun above
    import torch.distributed as dist

    res = {}
    for mode in ("sorted", "callback"):
        state, history, calls = train(os.path.join(sys.argv[1], "ddp"), 2, mode)
        res[mode] = {"state": state, "history": history, "calls": calls}
    res["faults"] = faults(os.path.join(sys.argv[1], "faults"))
    if dist.get_rank() == 0:
        torch.save(res, os.path.join(sys.argv[1], "state.pt"))
    dist.barrier()
    dist.destroy_process_group()  # a clean teardown: gloo's threads left at exit can abort a rank (exit -6)
