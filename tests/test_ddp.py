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


def test_rank_shares_reproduce_the_single_process_step():
    """What the ranks compute from their slices — each rank's gradient of ``loss_scale(W) · (token NLL summed over
    its share) / count_targets(whole step)``, averaged over ranks as DDP does — is the gradient of one process's
    mean token NLL over the whole step, with torch's ``cross_entropy(reduction="mean")`` on the padded, shifted
    batch as the independent reference; and the slices are the step's examples, in order, each once."""
    seed = int(torch.seed() % 2**31)
    g = torch.Generator().manual_seed(seed)
    examples = []
    for _ in range(8):  # ragged questions and answers: shares differ in their token counts
        q, a = (int(x) for x in torch.randint(1, 9, (2,), generator=g))
        ids = torch.randint(1, VOCAB, (q + a,), generator=g).tolist()
        examples.append({"input_ids": ids, "labels": [-100] * q + ids[q:]})
    embed = torch.randn(VOCAB, 16, generator=g, dtype=torch.float64)
    head = torch.randn(16, VOCAB, generator=g, dtype=torch.float64, requires_grad=True)

    def padded(batch):
        n = max(len(e["input_ids"]) for e in batch)
        ids = torch.tensor([e["input_ids"] + [0] * (n - len(e["input_ids"])) for e in batch])
        labels = torch.tensor([e["labels"] + [-100] * (n - len(e["labels"])) for e in batch])
        return embed[ids] @ head, labels  # a tiny "model": logits [B, T, V]

    logits, labels = padded(examples)
    reference = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), labels[:, 1:].reshape(-1))
    (expected,) = torch.autograd.grad(reference, head)
    for world in (1, 2, 4):
        shares = [rank_slice(examples, r, world) for r in range(world)]
        assert [e for share in shares for e in share] == examples, world
        grads = []
        for share in shares:
            logits, labels = padded(share)
            nll = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), labels[:, 1:].reshape(-1),
                                                    reduction="sum")
            grads.append(torch.autograd.grad(loss_scale(world) * nll / count_targets(examples), head)[0])
        torch.testing.assert_close(sum(grads) / world, expected, rtol=1e-12, atol=1e-12,
                                   msg=lambda m: f"world {world}, seed {seed}: {m}")
    with pytest.raises(ValueError, match="do not split evenly over 3"):
        rank_slice(examples, 0, 3)
    with pytest.raises(ValueError, match="rank: must lie in"):
        rank_slice(examples, 4, 4)
