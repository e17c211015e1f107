"""The training loop: step plan, data order, gradient accumulation == one big batch (against a float64 hand
computation of the loss), atomic checkpoints."""
import pytest
import torch
from accelerate import Accelerator
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from rklu_fast.data import encode_qa, get_template, load_tofu
from rklu_fast.train import checkpoint, loop
from rklu_fast.train.frozen import Frozen
from rklu_fast.train.methods import make_method, make_retain_term
from rklu_fast.train.teacher import OnlineTeacher
from tiny_pipeline import tofu_dir, tokenizer_dir



def acc():
    """A CPU accelerator for this test (accelerate's process-wide state is reset between tests)."""
    return Accelerator(cpu=True, mixed_precision="no")


@pytest.fixture(scope="module")
def data():
    tok = AutoTokenizer.from_pretrained(tokenizer_dir())
    t = get_template("llama2")

    def enc(split):
        return [encode_qa(tok, t, r["question"], r["answer"]) for r in load_tofu(split, tofu_dir())]

    return tok, enc("forget01"), enc("retain99")


def tiny_llama(vocab, seed):
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=256))


def test_plan_steps_follows_the_paper():
    assert loop.plan_steps(400, 10, 32) == (125, 12)  # ⌊10·400/32⌋ steps, warm-up = first epoch
    assert loop.plan_steps(40, 10, 32) == (12, 1)
    assert loop.plan_steps(10, 1, 32) == (1, 1)  # at least one step, at least one warm-up step


def test_example_stream_is_a_seeded_permutation_per_epoch():
    ex = [{"i": i} for i in range(10)]
    s = loop.ExampleStream(ex, per_step=4, seed=3)
    drawn = [(epoch, e["i"]) for step in range(5) for epoch, e in s.step(step)]  # 20 positions = 2 epochs
    first_epochs = [i for _, i in drawn]
    assert sorted(first_epochs[:10]) == list(range(10)) and sorted(first_epochs[10:]) == list(range(10))
    assert first_epochs[:10] != first_epochs[10:]
    assert [epoch for epoch, _ in drawn] == [0] * 10 + [1] * 10  # step 2 straddles the two epochs
    again = loop.ExampleStream(ex, per_step=4, seed=3)
    assert [e["i"] for _, e in again.step(3)] == first_epochs[12:16]  # a pure function of the step


def _hand_loss(model, teacher, forget, retain, tok, alpha, lam):
    """RKLU forget term + λ·KL retain term of the whole step, in float64, from the definitions."""
    from rklu_fast.data.collate import collate

    def rows(batch, m):
        logits = m(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        valid = batch["labels"][:, 1:] != -100
        return logits[:, :-1][valid].double()

    f, r = collate(forget, tok.pad_token_id), collate(retain, tok.pad_token_id)
    with torch.no_grad():
        lo, la = rows(f, teacher.original), rows(f, teacher.augmented)
        lo_r = rows(r, teacher.original)
    zs, zr = rows(f, model), rows(r, model)
    lt = lo - alpha * torch.relu(la - lo)
    logp, logq = zs.log_softmax(-1), lt.log_softmax(-1)
    forget_term = (logp.exp() * (logp - logq)).sum() / len(zs)
    logpo, logpr = lo_r.log_softmax(-1), zr.log_softmax(-1)
    retain_term = (logpo.exp() * (logpo - logpr)).sum() / len(zr)
    return forget_term + lam * retain_term


@pytest.mark.parametrize("method,retain_name", [("rklu", "KL"), ("nll", "RT")])
def test_accumulating_4_micro_batches_equals_one_big_batch(data, method, retain_name):
    tok, forget, retain = data
    vocab = len(tok)
    teacher = OnlineTeacher(tiny_llama(vocab, 1), tiny_llama(vocab, 2))
    m = make_method(method, alpha=8.0, backend="torch")
    rt = make_retain_term(retain_name, backend="torch")
    grads = []
    for micro in (2, 8):
        model = tiny_llama(vocab, 0)
        loop.accumulate_gradients(model, m, [{"forget": e} for e in forget[:8]], micro, tok.pad_token_id, acc(),
                                  frozen=Frozen(teacher=teacher, original=teacher.original),
                                  retain_examples=retain[:8], retain_term=rt, retain_weight=0.5)
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)
    if method == "rklu":  # and both equal the gradient of the loss written out by hand in float64
        model = tiny_llama(vocab, 0)
        _hand_loss(model, teacher, forget[:8], retain[:8], tok, 8.0, 0.5).backward()
        for a, p in zip(grads[0], model.parameters()):
            torch.testing.assert_close(a, p.grad, rtol=1e-4, atol=1e-7)


def test_train_with_accumulation_matches_big_batch_weights(data, tmp_path):
    tok, forget, _ = data
    stage = {"epochs": 1, "lr": 1e-3, "weight_decay": 0.01, "batch_size": 8, "micro_batch_size": 8,
             "warmup_epochs": 1.0, "max_grad_norm": 1.0}
    finals = []
    for micro in (2, 8):
        model = tiny_llama(len(tok), 0)
        assert loop.train(model, tok, make_method("nll"), forget[:8] * 2, dict(stage, micro_batch_size=micro),
                          tmp_path / f"m{micro}", acc(), tensorboard=False)
        finals.append(model.state_dict())
    for k in finals[0]:
        torch.testing.assert_close(finals[0][k], finals[1][k], rtol=1e-4, atol=1e-5)


def test_atomic_directory_all_or_nothing(tmp_path):
    target = tmp_path / "ckpt"
    with pytest.raises(RuntimeError):
        with checkpoint.atomic_directory(target) as tmp:
            (tmp / "half.bin").write_bytes(b"x")
            raise RuntimeError("killed mid-write")
    assert not target.exists() and list(tmp_path.iterdir()) == []
    with checkpoint.atomic_directory(target) as tmp:
        (tmp / "a").write_text("1")
    with checkpoint.atomic_directory(target) as tmp:  # replacing keeps only the new content
        (tmp / "b").write_text("2")
    assert sorted(p.name for p in target.iterdir()) == ["b"] and len(list(tmp_path.iterdir())) == 1


def test_retain_positions_count_the_padding_of_the_micro_batches_as_formed():
    """The KL term over all positions divides by the padded positions of the retain micro-batches: lengths
    2, 9, 3, 8 in micro-batches of 2 pad to 2·3 + 2·9 = 24 positions grouped by length ((2, 3), (8, 9)), and to
    2·9 + 2·8 = 34 in drawing order ((2, 9), (3, 8))."""
    from rklu_fast.train.loop import step_counts
    retain = [{"input_ids": [1] * n, "labels": [1] * n} for n in (2, 9, 3, 8)]
    assert step_counts([], retain, 2).retain_positions == 24
    assert step_counts([], retain, 2, group_by_length=False).retain_positions == 34
