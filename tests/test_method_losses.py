"""Every method's loss against an independent float64 computation of its formula from the same logits, written
here with plain torch ops (log-softmax, gathers, loops over sequences), including the normalisation by the WHOLE
step's counts (the counts given are larger than this micro-batch's, as under accumulation)."""
import math

import pytest
import torch

from rklu_fast.data.collate import collate
from rklu_fast.train.frozen import TeacherRows
from rklu_fast.train.methods import StepCounts, make_method, make_retain_term

V = 23


def _batch(gen, n=3, min_q=2, max_len=9, key_prefix="gold"):
    """A collated batch of ``n`` random sequences: question tokens ignored, then answer tokens (≥ 1)."""
    examples = []
    for i in range(n):
        length = int(torch.randint(min_q + 2, max_len + 1, (1,), generator=gen))
        q = int(torch.randint(1, length - 1, (1,), generator=gen))
        ids = torch.randint(0, V, (length,), generator=gen).tolist()
        examples.append({"input_ids": ids, "labels": [-100] * q + ids[q:], "attention_mask": [1] * length,
                         "index": i, "key": (key_prefix, i)})
    return collate(examples, pad_token_id=0)


def _logits(gen, batch):
    b, t = batch["input_ids"].shape
    return (torch.randn(b, t, V, generator=gen) * 2).requires_grad_(True)


def _targets(labels):
    """(sequence, position of the scoring logit, target token) for every counted target: independent of the code
    under test's masking helpers."""
    out = []
    for s, row in enumerate(labels.tolist()):
        for t in range(1, len(row)):
            if row[t] != -100:
                out.append((s, t - 1, row[t]))
    return out


def _seq_logprob64(logits, labels):
    """Per-sequence summed float64 log-likelihood and target count, by an explicit loop."""
    logp = torch.log_softmax(logits.double(), dim=-1)
    total = [torch.zeros((), dtype=torch.float64) for _ in range(len(labels))]
    count = [0] * len(labels)
    for s, t, y in _targets(labels):
        total[s] = total[s] + logp[s, t, y]
        count[s] += 1
    return torch.stack(total), torch.tensor(count, dtype=torch.float64)


class _Frozen:
    """Stand-in frozen side: fixed reference values by key, a fixed teacher, fixed original logits."""

    def __init__(self, reference=None, teacher=None, original=None):
        self.reference, self._teacher, self.original = reference, teacher, original

    def reference_logprob(self, batch):
        return torch.tensor([self.reference[k] for k in batch["key"]], dtype=torch.float32)

    def teacher(self, batch):
        return self._teacher

    def original_logits(self, batch):
        return self.original


def _student(logits_by_batch):
    def student(batch):
        return logits_by_batch[id(batch)]
    return student


def _check(loss, hand, leaves):
    """Loss value and the gradient of every leaf logits tensor against the float64 hand computation."""
    torch.testing.assert_close(loss.double(), hand.detach(), rtol=1e-5, atol=1e-6)
    grads = torch.autograd.grad(loss, leaves)
    hand_grads = torch.autograd.grad(hand, [x for x in leaves])
    for g, h in zip(grads, hand_grads):
        torch.testing.assert_close(g.double(), h.double(), rtol=1e-4, atol=1e-6)


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(int(torch.seed() % 2**31))


def test_ga_is_minus_token_nll_over_step_tokens(gen):
    b = _batch(gen)
    z = _logits(gen, b)
    n_step = len(_targets(b["labels"])) + 7  # other micro-batches of the step hold 7 more targets
    loss, _ = make_method("ga").loss(_student({id(b): z}), {"forget": b}, None,
                                     StepCounts(tokens={"forget": n_step}, sequences=5))
    logp = torch.log_softmax(z.double(), -1)
    hand = sum(logp[s, t, y] for s, t, y in _targets(b["labels"])) / n_step
    _check(loss, hand, [z])


@pytest.mark.parametrize("beta", [0.1, 2.0])
def test_npo(gen, beta):
    b = _batch(gen)
    z = _logits(gen, b)
    ref = {("gold", i): -float(torch.rand((), generator=gen)) * 20 for i in range(3)}
    method = make_method("npo", beta=beta)
    loss, _ = method.loss(_student({id(b): z}), {"forget": b}, _Frozen(reference=ref),
                          StepCounts(tokens={"forget": 99}, sequences=8))
    lp, _ = _seq_logprob64(z, b["labels"])
    r = torch.tensor([ref[("gold", i)] for i in range(3)], dtype=torch.float64)
    ratio_pow = torch.exp(beta * (lp - r))  # (π_θ/π_ref)^β
    hand = (2 / beta) * torch.log1p(ratio_pow).sum() / 8
    _check(loss, hand, [z])
    assert make_method("npo").ctx.beta == 0.1  # the paper's default


@pytest.mark.parametrize("beta,delta", [(4.5, 0.0), (2.5, 0.7)])
def test_simnpo(gen, beta, delta):
    b = _batch(gen)
    z = _logits(gen, b)
    loss, _ = make_method("simnpo", beta=beta, delta=delta).loss(
        _student({id(b): z}), {"forget": b}, None, StepCounts(tokens={"forget": 50}, sequences=6))
    lp, n = _seq_logprob64(z, b["labels"])
    x = -beta * lp / n - delta
    hand = -(2 / beta) * torch.log(1 / (1 + torch.exp(-x))).sum() / 6
    _check(loss, hand, [z])


def test_simnpo_defaults_are_the_authors_tofu_settings():
    ten, five = make_method("simnpo", forget_split="forget10"), make_method("simnpo", forget_split="forget05")
    assert (ten.ctx.beta, ten.ctx.delta, ten.ctx.forget_weight) == (4.5, 0.0, 0.125)
    assert (five.ctx.beta, five.ctx.forget_weight) == (2.5, 0.1375)
    assert make_method("simnpo", forget_split="forget10", forget_weight=1.0).ctx.forget_weight == 1.0
    assert make_method("ga").ctx.forget_weight == 1.0


def test_idk_is_token_nll_of_the_refusal_view(gen):
    b = _batch(gen, key_prefix="refusal")
    z = _logits(gen, b)
    method = make_method("idk", refusals=["I don't know."], encode=lambda q, a: {}, questions=["q"])
    loss, _ = method.loss(_student({id(b): z}), {"forget": b}, None, StepCounts(tokens={"forget": 40}, sequences=4))
    logp = torch.log_softmax(z.double(), -1)
    hand = -sum(logp[s, t, y] for s, t, y in _targets(b["labels"])) / 40
    _check(loss, hand, [z])


@pytest.mark.parametrize("form", ["tofu", "open-unlearning"])
def test_idk_dpo(gen, form):
    chosen, rejected = _batch(gen, key_prefix="refusal"), _batch(gen, key_prefix="gold")
    zw, zl = _logits(gen, chosen), _logits(gen, rejected)
    ref = {k: -float(torch.rand((), generator=gen)) * 15 for p in ("refusal", "gold") for k in [(p, 0), (p, 1), (p, 2)]}
    beta = 0.1
    method = make_method("dpo", refusals=["no"], encode=lambda q, a: {}, questions=["q"], dpo_form=form)
    loss, stats = method.loss(_student({id(chosen): zw, id(rejected): zl}), {"chosen": chosen, "rejected": rejected},
                              _Frozen(reference=ref), StepCounts(tokens={"chosen": 1, "rejected": 1}, sequences=5),
                              want_stats=True)
    lw, _ = _seq_logprob64(zw, chosen["labels"])
    ll, _ = _seq_logprob64(zl, rejected["labels"])
    rw = torch.tensor([ref[("refusal", i)] for i in range(3)], dtype=torch.float64)
    rl = torch.tensor([ref[("gold", i)] for i in range(3)], dtype=torch.float64)
    delta = (lw - ll) - (rw - rl)
    per = -torch.log(torch.sigmoid(beta * delta))
    hand = (per.sum() / 5) * (2 / beta if form == "open-unlearning" else 1.0)
    _check(loss, hand, [zw, zl])
    torch.testing.assert_close(stats["dpo_margin"].double(), delta.sum().detach(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["rklu", "fklu"])
def test_kl_to_teacher(gen, name):
    b = _batch(gen)
    z = _logits(gen, b)
    lo, la = torch.randn(*z.shape, generator=gen), torch.randn(*z.shape, generator=gen)
    alpha = 8.0
    method = make_method(name, alpha=alpha, backend="torch")
    teacher = TeacherRows(lo[:, :-1], la[:, :-1], "all")
    loss, _ = method.loss(_student({id(b): z}), {"forget": b}, _Frozen(teacher=teacher),
                          StepCounts(tokens={"forget": 31}, sequences=3))
    hand = torch.zeros((), dtype=torch.float64)
    for s, t, _y in _targets(b["labels"]):
        lt = lo[s, t].double() - alpha * torch.clamp(la[s, t].double() - lo[s, t].double(), min=0)
        logp, logq = torch.log_softmax(z[s, t].double(), -1), torch.log_softmax(lt, -1)
        hand = hand + ((logp.exp() * (logp - logq)).sum() if name == "rklu" else (logq.exp() * (logq - logp)).sum())
    _check(loss, hand / 31, [z])


def test_retain_nll_and_kl_on_answers_and_on_all_positions(gen):
    b = _batch(gen)
    z = _logits(gen, b)
    lo = torch.randn(*z.shape, generator=gen)
    n_tokens = len(_targets(b["labels"]))
    positions = b["input_ids"].numel()
    counts = StepCounts(tokens={}, sequences=3, retain_tokens=n_tokens + 5, retain_positions=positions + 11)
    student = _student({id(b): z})

    loss = make_retain_term("RT").loss(student, b, None, counts)
    logp = torch.log_softmax(z.double(), -1)
    _check(loss, -sum(logp[s, t, y] for s, t, y in _targets(b["labels"])) / (n_tokens + 5), [z])

    def kl(s, t):  # KL(p_o ‖ p_θ) at one position
        logq, logp_ = torch.log_softmax(lo[s, t].double(), -1), torch.log_softmax(z[s, t].double(), -1)
        return (logq.exp() * (logq - logp_)).sum()

    frozen = _Frozen(original=lo)
    loss = make_retain_term("KL", backend="torch").loss(student, b, frozen, counts)
    _check(loss, sum(kl(s, t) for s, t, _ in _targets(b["labels"])) / (n_tokens + 5), [z])
    loss = make_retain_term("KL", backend="torch", kl_positions="all").loss(student, b, frozen, counts)
    every = [(s, t) for s in range(z.shape[0]) for t in range(z.shape[1])]  # prompt, padding, last position too
    _check(loss, sum(kl(s, t) for s, t in every) / (positions + 11), [z])
    with pytest.raises(ValueError, match="retain_kl_positions"):
        make_retain_term("KL", kl_positions="padding")


def test_task_arithmetic_closed_form():
    from transformers import LlamaConfig, LlamaForCausalLM

    from rklu_fast.train.methods.ta import task_arithmetic
    cfg = LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2)
    torch.manual_seed(int(torch.seed() % 2**31))
    original, augmented = LlamaForCausalLM(cfg), LlamaForCausalLM(cfg)
    before = {n: p.detach().double().clone() for n, p in original.named_parameters()}
    theirs = {n: p.detach().double() for n, p in augmented.named_parameters()}
    out = task_arithmetic(original, augmented, 2.5)
    for name, p in out.named_parameters():  # embeddings and norms included
        torch.testing.assert_close(p.double(), before[name] - 2.5 * (theirs[name] - before[name]),
                                   rtol=1e-6, atol=1e-6)
    assert math.isclose(make_method("ta").ctx.beta, 2.5)
