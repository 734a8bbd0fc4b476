"""SortedTrainer under DDP (``torchrun --nproc_per_node 2``, gloo, CPU) equals one process.

Transformers' Trainer wraps the model in DDP with ``find_unused_parameters=True``; its reducer would miss
the in-place gradients of sliced weights and average stale or partial ones. SortedTrainer runs every
backward under ``no_sync`` and all-reduces the gradients once per optimizer step. Every slice here uses
the in-place gradient path (``INPLACE_MIN_NUMEL = 0``). Each optimizer step sees the whole 4-sample
dataset (2 per rank, or 4 in one process), so the two runs must agree whatever the data order.
"""

from __future__ import annotations

import json
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


def train(out_dir: str, world: int) -> tuple[dict, list]:
    from transformers import LlamaConfig, LlamaForCausalLM, TrainingArguments

    import sortednet as sn
    import sortednet.slicers as slicers
    from sortednet.integrations import SortedTrainer

    slicers.INPLACE_MIN_NUMEL = 0
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=40, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                                         num_attention_heads=4, num_key_value_heads=2, bos_token_id=0,
                                         eos_token_id=0, pad_token_id=0))
    nest = sn.from_transformers(model, ffn=[16, 32], heads=[2], depth=[1, 2])
    x = torch.randint(1, 40, (4, 9), generator=torch.Generator().manual_seed(1))
    data = [{"input_ids": row, "labels": row} for row in x]
    args = TrainingArguments(out_dir, max_steps=STEPS, per_device_train_batch_size=4 // world, optim="sgd",
                             learning_rate=0.5, max_grad_norm=0.0, weight_decay=0.0, report_to=[], use_cpu=True,
                             save_strategy="no", disable_tqdm=True, logging_strategy="no", seed=0,
                             ddp_backend="gloo" if world > 1 else None)
    trainer = SortedTrainer(model=model, args=args, train_dataset=data, nest=nest,
                            sampler=sn.Sampler(nest.submodels, k=3, strategy="sandwich", seed=5))
    trainer.train()
    return model.state_dict(), [[str(s) for s in subs] for _, subs in trainer.history]


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
    ref, history = train(str(tmp_path / "one"), 1)
    assert json.loads((tmp_path / "history.json").read_text()) == history
    assert any(sub != history[0][0] for subs in history for sub in subs)  # sub-models below the largest trained
    for k, v in ref.items():
        torch.testing.assert_close(ddp[k], v, atol=1e-5, rtol=0, msg=lambda m, k=k: f"{k}: {m}")


if __name__ == "__main__":  # one rank of the torchrun above
    import torch.distributed as dist

    state, history = train(os.path.join(sys.argv[1], "ddp"), 2)
    if dist.get_rank() == 0:
        torch.save(state, os.path.join(sys.argv[1], "state.pt"))
        with open(os.path.join(sys.argv[1], "history.json"), "w") as f:
            json.dump(history, f)
