"""Teacher forms l_o − α·relu(l_aug − c − l_o): the per-row shift c against an independent float64 computation,
the loss on every CPU backend against a float64 reference (rows with −inf teacher entries included), the online
and the cached teacher source giving the same rows, and a row with no finite shift refused."""
import copy
import math

import numpy as np
import pytest
import torch

import rklu_fast
from rklu_fast.backends import backends
from rklu_fast.reference import TEACHER_FORMS, augmented_shift, shifted_augmented

NEG = float("-inf")
CPU_BACKENDS = [b for b in ("torch", "cpu", "triton") if backends()[b]["usable"]]


def _rows(gen, n=6, v=50, holes=True):
    lo = torch.randn(n, v, generator=gen, dtype=torch.float64) * 3
    la = lo + torch.randn(n, v, generator=gen, dtype=torch.float64) + 2.0  # the augmented model drifts up
    if holes:  # −inf entries in the original, in the augmented model, and in both
        lo[0, :7] = NEG
        la[1, 3:9] = NEG
        lo[2, 10], la[2, 10] = NEG, NEG
    return lo, la


def _shift64(lo, la, form):
    """c per row, by plain Python over the row's entries (numpy's median: the mean of the two middle values)."""
    out = []
    for a, b in zip(lo.tolist(), la.tolist()):
        if form == "logits":
            out.append(0.0)
        elif form == "logprobs":
            lse = lambda xs: math.log(sum(math.exp(x) for x in xs if x != NEG))  # noqa: E731
            out.append(lse(b) - lse(a))
        else:
            d = [y - x for x, y in zip(a, b) if x != NEG and y != NEG]
            out.append(sum(d) / len(d) if form == "centered_mean" else float(np.median(d)))
    return torch.tensor(out, dtype=torch.float64)[:, None]


@pytest.mark.parametrize("form", TEACHER_FORMS)
def test_shift_matches_an_independent_computation(form):
    gen = torch.Generator().manual_seed(int(torch.seed() % 2**31))
    lo, la = _rows(gen)
    torch.testing.assert_close(augmented_shift(lo, la, form), _shift64(lo, la, form), rtol=1e-12, atol=1e-12)
    odd = _rows(gen, v=51)  # an odd count of finite differences in some rows, even in others
    torch.testing.assert_close(augmented_shift(*odd, form), _shift64(*odd, form), rtol=1e-12, atol=1e-12)
    if form == "logits":
        assert shifted_augmented(lo, la, form) is la  # the paper's teacher: untouched, no copy


def test_logprob_teacher_ignores_a_uniform_logit_shift_of_the_augmented_model():
    gen = torch.Generator().manual_seed(3)
    lo, la = _rows(gen, holes=False)
    for form in ("logprobs", "centered_mean", "centered_median"):
        a = rklu_fast.teacher_logits(lo, la, 8.0, form)
        b = rklu_fast.teacher_logits(lo, la + 5.0, 8.0, form)
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    raw = rklu_fast.teacher_logits(lo, la + 5.0, 8.0, "logits")  # the paper's is not invariant
    assert not torch.allclose(raw, rklu_fast.teacher_logits(lo, la, 8.0, "logits"))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("form", TEACHER_FORMS)
@pytest.mark.parametrize("reverse", [True, False])
def test_loss_of_every_form_on_every_backend(backend, form, reverse):
    gen = torch.Generator().manual_seed(int(torch.seed() % 2**31))
    lo, la = _rows(gen)
    z = torch.randn(lo.shape, generator=gen, dtype=torch.float64)
    alpha = 4.0
    c = _shift64(lo, la, form)
    penalty = torch.clamp(torch.where(torch.isfinite(la) & torch.isfinite(lo), la - c - lo, torch.zeros_like(lo)),
                          min=0)
    penalty = torch.where(torch.isfinite(lo) & (la == NEG), torch.zeros_like(lo), penalty)
    lt = torch.where(lo == NEG, lo, lo - alpha * penalty)
    logp, logq = torch.log_softmax(z, -1), torch.log_softmax(lt, -1)
    if reverse:
        ref = torch.where(logp == NEG, 0.0, logp.exp() * (logp - logq)).sum(-1).mean()
    else:
        ref = torch.where(logq == NEG, 0.0, logq.exp() * (logq - logp)).sum(-1).mean()
    loss_fn = rklu_fast.reverse_kl_loss if reverse else rklu_fast.forward_kl_loss
    student = z.float().requires_grad_(True)
    got = loss_fn(student, lo.float(), shifted_augmented(lo.float(), la.float(), form).float(), alpha=alpha,
                  backend=backend)
    torch.testing.assert_close(got.double(), ref, rtol=2e-5, atol=2e-5)


def test_a_row_without_a_finite_shift_is_refused():
    lo, la = torch.randn(3, 10), torch.randn(3, 10)
    la[1] = NEG
    for form in ("logprobs", "centered_mean", "centered_median"):
        with pytest.raises(ValueError, match=f"teacher_form='{form}': a row's shift is not finite"):
            augmented_shift(lo, la, form)
    with pytest.raises(ValueError, match="teacher_form: must be one of"):
        augmented_shift(lo, la, "softmax")


def _tiny_models(seed):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=60, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64)
    original = LlamaForCausalLM(cfg).eval()
    augmented = copy.deepcopy(original)
    with torch.no_grad():
        for p in augmented.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return original, augmented


@pytest.mark.parametrize("form", TEACHER_FORMS)
def test_online_and_cached_sources_give_the_same_rows(form):
    from rklu_fast.data.collate import collate, target_mask
    from rklu_fast.data.templates import get_template
    from rklu_fast.train.teacher import OnlineTeacher
    from rklu_fast.train.teacher_cache import make_teacher
    original, augmented = _tiny_models(1)
    gen = torch.Generator().manual_seed(0)
    examples = []
    for i in range(5):
        ids = torch.randint(1, 60, (6 + i,), generator=gen).tolist()
        examples.append({"input_ids": ids, "labels": [-100] * 3 + ids[3:], "attention_mask": [1] * len(ids),
                         "index": i})
    kw = dict(template=get_template("llama2"), pad_token_id=0, device="cpu", micro_batch_size=2, form=form)
    online = make_teacher("online", original, augmented, examples, **kw)
    cached = make_teacher("cached", original, augmented, examples, **kw)
    assert isinstance(online, OnlineTeacher) and cached.cache.key.teacher_form == form
    batch = collate(examples[1:4], 0)
    on, ca = online.rows(batch), cached.rows(batch)
    mask = target_mask(batch["labels"])
    torch.testing.assert_close(ca.original, on.original[mask], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ca.augmented, on.augmented[mask], rtol=1e-5, atol=1e-5)
    # and both are the float64 teacher of the two models' logits
    with torch.no_grad():
        lo = original(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1][mask]
        la = augmented(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1][mask]
    want = lo.double() - 8.0 * torch.clamp(la.double() - _shift64(lo.double(), la.double(), form) - lo.double(),
                                           min=0)
    torch.testing.assert_close(rklu_fast.teacher_logits(ca.original, ca.augmented, 8.0).double(), want,
                               rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("form", ["logprobs", "centered_mean"])
def test_combined_cache_of_bf16_models_rounds_the_teacher_once(form):
    """bf16 models: the combined cache holds the teacher formed from the models' logits and the form's shift in
    float32, rounded once to bf16 (not the shifted augmented logits rounded first, an error α times larger)."""
    from rklu_fast.data.collate import collate, target_mask
    from rklu_fast.data.templates import get_template
    from rklu_fast.train.teacher_cache import make_teacher
    original, augmented = (m.to(torch.bfloat16) for m in _tiny_models(2))
    with torch.no_grad():  # logits of a useful size: bf16 rounds them by up to 2**-8 of their magnitude
        for m in (original, augmented):
            m.lm_head.weight.mul_(40)
    gen = torch.Generator().manual_seed(3)
    examples = []
    for i in range(4):
        ids = torch.randint(1, 60, (7 + i,), generator=gen).tolist()
        examples.append({"input_ids": ids, "labels": [-100] * 2 + ids[2:], "attention_mask": [1] * len(ids),
                         "index": i})
    cached = make_teacher("cached", original, augmented, examples, template=get_template("llama2"),
                          pad_token_id=0, device="cpu", micro_batch_size=1, form=form, store="combined", alpha=8.0)
    got, want = [], []
    for e in examples:  # one example per forward, as the cache was built: the very same bf16 logits
        batch = collate([e], 0)
        mask = target_mask(batch["labels"])
        with torch.no_grad():
            lo, la = (m(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1][mask]
                      .double() for m in (original, augmented))
        want.append(lo - 8.0 * torch.clamp(la - _shift64(lo, la, form) - lo, min=0))
        got.append(cached.rows(batch).original.double())
    got, want = torch.cat(got), torch.cat(want)
    assert got.dtype == torch.float64 and cached.cache.key.dtype == "bfloat16"
    # one rounding to bf16: within half an ulp (2**-8 relative: 8 significant bits; float32 adds far less)
    worst = float(((got - want).abs() / want.abs().clamp(min=1e-30)).max())
    assert worst <= 2 ** -8 * 1.001, worst
