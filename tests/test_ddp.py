"""DDP (accelerate's, 2 CPU processes over gloo): ``rklu unlearn`` with the cached teacher (written by rank 0 to
``teacher.cache_dir``, memory-mapped by both) computes the same optimizer steps as one process at the same
effective batch, and the gradients are synchronised once per optimizer step (``no_sync`` on every backward but
the step's last) without changing them."""
import pytest
import torch

from gloo_runs import (BATCH, MICRO, REFERENCE_RUNS, STEPS, gradient_step, launch, losses, reference, unlearn,
                       weights)
from rklu_fast.data.collate import count_targets
from rklu_fast.train.sampling import loss_scale, rank_slice
from tiny_pipeline import needs_tofu

VOCAB = 64


def _ddp_run(rank, world, run_dir, calls_file):
    """``rklu unlearn`` under DDP, counting the all-reduces of gradients (a comm hook on the DDP model)."""
    import json

    from accelerate import Accelerator
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    calls = []
    prepare = Accelerator.prepare

    def counting_prepare(self, *args):
        out = prepare(self, *args)
        out[0].register_comm_hook(None, lambda state, bucket: calls.append(1) or allreduce_hook(state, bucket))
        return out
    Accelerator.prepare = counting_prepare
    unlearn(rank, world, run_dir, REFERENCE_RUNS["rt"])
    with open(f"{calls_file}-{rank}.json", "w") as f:
        json.dump(len(calls), f)


@needs_tofu
def test_ddp_matches_one_process_with_the_cached_teacher(tmp_path):
    import json

    ref = reference() / "rt"
    assert launch(_ddp_run, 2, tmp_path / "ddp", tmp_path / "calls") == [0, 0]
    one, two = losses(ref), losses(tmp_path / "ddp")  # only rank 0 writes the log
    assert [s for s, *_ in one] == [s for s, *_ in two] == list(range(1, STEPS + 1))
    for (step, f1, r1), (_, f2, r2) in zip(one, two):
        assert f1 > 0 and r1 > 0
        assert abs(f2 - f1) <= 1e-5 * abs(f1) and abs(r2 - r1) <= 1e-5 * abs(r1), step
    w1, w2 = weights(ref), weights(tmp_path / "ddp")
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], rtol=1e-4, atol=1e-6, msg=k)
    # one all-reduce per optimizer step on each rank (the tiny model's gradients fill one bucket)
    assert [json.load(open(f"{tmp_path / 'calls'}-{r}.json")) for r in (0, 1)] == [STEPS, STEPS]


@needs_tofu
def test_ddp_synchronises_once_per_step_without_changing_the_gradient(tmp_path):
    """One step of 2 micro-steps per rank, each a forget and a retain backward: the loop all-reduces once, with
    every gradient element in it, where a sync per backward would all-reduce 4 times; the gradient is the same
    either way and equals one process's gradient of the whole step."""
    seed = int(torch.seed() % 2**31)
    assert launch(gradient_step, 1, "ddp", tmp_path / "one.pt", seed) == [0]
    assert launch(gradient_step, 2, "ddp", tmp_path / "two.pt", seed) == [0, 0]
    one, two = torch.load(tmp_path / "one.pt"), torch.load(tmp_path / "two.pt")
    numel = sum(g.numel() for g in one["loop"]["grads"].values())
    assert two["loop"]["collectives"] == [numel]
    assert len(two["every_backward"]["collectives"]) == 2 * (BATCH // 2 // MICRO)
    assert two["loop"]["seen"] == BATCH // 2 and one["loop"]["seen"] == BATCH  # each rank its half
    for mode in ("loop", "every_backward"):
        for name, expected in one["loop"]["grads"].items():
            torch.testing.assert_close(two[mode]["grads"][name], expected, rtol=1e-5, atol=1e-7,
                                       msg=lambda m: f"{mode}, {name}, seed {seed}: {m}")


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


def _full_disk(rank, world, run_dir, fault):
    from gloo_runs import unlearn_with_fault

    unlearn_with_fault(rank, world, run_dir, fault, REFERENCE_RUNS["rt"])


@needs_tofu
def test_a_failed_checkpoint_write_stops_every_rank(tmp_path):
    """Rank 0, the one writer, fails to write the first checkpoint (disk full, injected): rank 1 does not wait
    for it forever but stops with the same error (exit 1, the --resume command); nothing of it is kept."""
    from gloo_runs import N_FORGET, assert_every_rank_stopped_on_the_failed_write
    from rklu_fast.train import checkpoint

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    assert launch(_full_disk, 2, run_dir, f"unlearned:{N_FORGET // BATCH}:{checkpoint.STATE_FILE}",
                  timeout=240) == [0, 0]
    assert_every_rank_stopped_on_the_failed_write(run_dir)
