"""Multi-process training: 2 CPU processes (DDP over gloo, through accelerate and the real training loop) compute
the same optimizer steps as 1 process at the same effective batch — per-step loss within 1e-5, same weights."""
import json
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from rklu_fast.data.collate import count_targets
from rklu_fast.train.sampling import loss_scale, rank_slice

N_EXAMPLES, BATCH, MICRO, VOCAB = 16, 8, 2, 64


def _examples():
    g = torch.Generator().manual_seed(7)
    out = []
    for _ in range(N_EXAMPLES):
        q, a = (int(x) for x in torch.randint(2, 7, (2,), generator=g))
        ids = torch.randint(1, VOCAB, (q + a,), generator=g).tolist()
        out.append({"input_ids": ids, "labels": [-100] * q + ids[q:], "attention_mask": [1] * (q + a)})
    return out


def _models():
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32)
    torch.manual_seed(0)
    student = LlamaForCausalLM(cfg)
    original = LlamaForCausalLM(cfg)
    original.load_state_dict(student.state_dict())
    augmented = LlamaForCausalLM(cfg)
    return student, original, augmented


class _Tokenizer:  # the loop reads only pad_token_id (and saves the tokenizer at epoch checkpoints: none here)
    pad_token_id = 0


class _Counting:
    """The RKLU method, counting the forget examples this process computed the loss on."""

    def __init__(self, method):
        self.method, self.seen = method, 0

    def __getattr__(self, name):
        return getattr(self.method, name)

    def loss(self, student, batch, frozen, counts, want_stats=False):
        self.seen += len(batch["forget"]["input_ids"])
        return self.method.loss(student, batch, frozen, counts, want_stats)


def _run(out_dir: str) -> None:
    """One (possibly distributed) RKLU run of 2 steps (1 epoch: no epoch checkpoint) through ``loop.train``."""
    from accelerate import Accelerator

    from rklu_fast.train import loop
    from rklu_fast.train.frozen import Frozen
    from rklu_fast.train.methods import make_method, make_retain_term
    from rklu_fast.train.teacher import OnlineTeacher

    accelerator = Accelerator(cpu=True, mixed_precision="no")
    student, original, augmented = _models()
    stage = {"epochs": 1, "lr": 1e-3, "weight_decay": 0.01, "batch_size": BATCH, "micro_batch_size": MICRO,
             "warmup_epochs": 1.0, "max_grad_norm": 1.0}
    examples = _examples()
    method = _Counting(make_method("rklu", alpha=8.0, backend="torch"))
    loop.train(student, _Tokenizer(), method, examples, stage, out_dir,
               accelerator, frozen=Frozen(teacher=OnlineTeacher(original, augmented)), retain_examples=examples[::-1],
               retain_term=make_retain_term("RT"), seed=3, tensorboard=False)
    with open(os.path.join(out_dir, f"seen-rank{accelerator.process_index}.json"), "w") as f:
        json.dump(method.seen, f)
    if accelerator.is_main_process:
        torch.save(accelerator.unwrap_model(student).state_dict(), os.path.join(out_dir, "weights.pt"))
    accelerator.wait_for_everyone()


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world))
    torch.set_num_threads(1)  # two processes on a small machine: no OpenMP oversubscription
    _run(out_dir)
    torch.distributed.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _losses(out_dir):
    with open(os.path.join(out_dir, "log.jsonl")) as f:
        return [(r["step"], r["forget_loss"], r["retain_loss"]) for r in map(json.loads, f)]


def test_two_gloo_processes_match_one_process(tmp_path, monkeypatch):
    single, multi = str(tmp_path / "single"), str(tmp_path / "multi")
    _run(single)  # 1 process: here (one spawn fewer to import torch and transformers in)
    # the workers are CPU ranks on a GPU machine too (accelerate's barrier would otherwise name GPU `rank`)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    mp.spawn(_worker, args=(2, _free_port(), multi), nprocs=2, join=True)
    one, two = _losses(single), _losses(multi)  # only rank 0 writes the log
    # each rank computed the loss on its half of each step's 8 examples: 2 steps x 4
    seen = [json.load(open(os.path.join(multi, f"seen-rank{r}.json"))) for r in (0, 1)]
    assert seen == [2 * BATCH // 2] * 2
    assert json.load(open(os.path.join(single, "seen-rank0.json"))) == 2 * BATCH
    assert [s for s, *_ in one] == [s for s, *_ in two] == [1, 2]
    for (_, f1, r1), (_, f2, r2) in zip(one, two):
        assert f1 > 0 and r1 > 0
        assert abs(f1 - f2) <= 1e-5 and abs(r1 - r2) <= 1e-5
    w1, w2 = torch.load(os.path.join(single, "weights.pt")), torch.load(os.path.join(multi, "weights.pt"))
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], rtol=1e-5, atol=1e-6, msg=k)
    w0 = _models()[0].state_dict()
    assert any(not torch.equal(w1[k], w0[k]) for k in w1)  # it trained


def test_rank_slices_partition_the_step():
    items = list(range(12))
    assert [rank_slice(items, r, 3) for r in range(3)] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]]
    assert rank_slice(items, 0, 1) == items
    with pytest.raises(ValueError, match="do not split evenly over 5"):
        rank_slice(items, 0, 5)
    with pytest.raises(ValueError, match="rank: must lie in"):
        rank_slice(items, 3, 3)
    ex = _examples()
    # the normaliser counts labels[1:] that are not ignored (the loss op never shifts: logits[:, :-1] vs labels[1:])
    assert count_targets(ex[:2]) == sum(sum(t != -100 for t in e["labels"][1:]) for e in ex[:2])
    assert loss_scale(4) == 4.0
