"""The teacher cache stores exactly the rows the online path computes from: cached and online RKLU losses and
gradients are bitwise equal on CPU; the memory-mapped cache round-trips; a stale cache is refused."""
import copy
import random

import pytest
import torch

import rklu_fast
from rklu_fast.data.collate import collate
from rklu_fast.data.templates import get_template
from rklu_fast.train.teacher_cache import (CachedTeacher, CacheKey, StaleTeacherCache, TeacherCache,
                                           build_forget_cache, data_fingerprint, model_fingerprint,
                                           model_logits_fn, template_fingerprint)

PAD = 0


def _models(seed):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=80, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64)
    original = LlamaForCausalLM(cfg).eval()
    augmented = copy.deepcopy(original)
    with torch.no_grad():
        for p in augmented.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return original, augmented


def _examples(seed, n=7):
    """Encoded QA-like examples: a question part (label -100) then an answer, varied lengths."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        q, a = rng.randint(2, 6), rng.randint(1, 9)
        ids = [rng.randint(1, 79) for _ in range(q + a)]
        out.append({"input_ids": ids, "labels": [-100] * q + ids[q:], "attention_mask": [1] * (q + a),
                    "index": len(out)})
    return out


def _key(original, augmented, examples, **changes):
    fields = dict(original=model_fingerprint(original), augmented=model_fingerprint(augmented),
                  data=data_fingerprint(examples), template=template_fingerprint(get_template("llama2")),
                  dtype="float32", vocab_size=80)
    return CacheKey(**{**fields, **changes})


def _online_and_cached_loss(student, teacher_online, teacher_cached, batch):
    """RKLU loss + student-logit gradient, with the online (all rows, sliced) and cached (valid rows) teacher."""
    out = []
    for teacher, rows in ((teacher_online, "all"), (teacher_cached, "valid")):
        logits = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        logits.retain_grad()
        orig, aug = teacher(batch)
        if rows == "all":
            orig, aug = orig[:, :-1], aug[:, :-1]
        loss = rklu_fast.reverse_kl_loss(logits[:, :-1], orig, aug, alpha=8.0, labels=batch["labels"][:, 1:],
                                         teacher_rows=rows, backend="torch")
        loss.backward()
        out.append((loss.detach(), logits.grad))
    return out


@pytest.mark.parametrize("on_disk", [False, True])
def test_cached_equals_online_bitwise(tmp_path, on_disk):
    seed = int(torch.seed() % 2**31)
    original, augmented = _models(seed)
    student = copy.deepcopy(original).train()
    examples = _examples(seed)
    key = _key(original, augmented, examples)
    online = model_logits_fn(original, augmented)
    cache = build_forget_cache(online, examples, key, pad_token_id=PAD, micro_batch_size=3,
                               path=tmp_path / "cache" if on_disk else None)
    assert cache.num_examples == 7 and cache.original.dtype == torch.float32
    cached = CachedTeacher(cache, examples)
    # the batches the cache was built from (forwarding is not batch-invariant in the last bit, see below)
    def cached_logits(batch):
        rows = cached.rows(batch)
        return rows.original, rows.augmented

    for start in (0, 3, 6):
        batch = collate(examples[start:start + 3], PAD)
        (l_on, g_on), (l_ca, g_ca) = _online_and_cached_loss(student, online, cached_logits, batch)
        assert l_on > 0
        assert torch.equal(l_on, l_ca)
        assert torch.equal(g_on, g_ca)
    # through the training method (the loop's path): the cached teacher's compact rows give the same loss
    from rklu_fast.train.frozen import Frozen
    from rklu_fast.train.methods import StepCounts, make_method
    from rklu_fast.train.teacher import OnlineTeacher
    method = make_method("rklu", alpha=8.0, backend="torch")
    batch = collate(examples[3:6], PAD)

    def frozen_student(b):
        with torch.no_grad():
            return student(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
    counts = StepCounts(tokens={"forget": 17}, sequences=3)
    (l_on, s_on), (l_ca, s_ca) = (method.loss(frozen_student, {"forget": batch}, Frozen(teacher=t), counts, True)
                                  for t in (OnlineTeacher(original, augmented), cached))
    assert torch.equal(l_on, l_ca) and s_on.keys() == s_ca.keys()
    assert all(torch.equal(s_on[k], s_ca[k]) for k in s_on)
    # another batch composition (a training shuffle): same rows up to the last bits of the forward's rounding,
    # which depends on the padded width — the cache fixes one value, the online path recomputes per batch
    batch = collate([examples[5], examples[1], examples[6]], PAD)
    orig, aug = online(batch)
    valid = batch["labels"][:, 1:] != -100
    c_orig, c_aug, _ = cached.rows(batch)
    torch.testing.assert_close(c_orig, orig[:, :-1][valid], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(c_aug, aug[:, :-1][valid], rtol=1e-5, atol=1e-5)


def test_memory_mapped_cache_round_trips_and_refuses_stale(tmp_path):
    original, augmented = _models(1)
    examples = _examples(1)
    key = _key(original, augmented, examples)
    path = tmp_path / "teacher-cache"
    in_memory = build_forget_cache(model_logits_fn(original, augmented), examples, key, pad_token_id=PAD)
    build_forget_cache(model_logits_fn(original, augmented), examples, key, pad_token_id=PAD, path=path)
    loaded = TeacherCache.load(path, key)
    assert torch.equal(loaded.original, in_memory.original) and torch.equal(loaded.augmented, in_memory.augmented)
    assert torch.equal(loaded.offsets, in_memory.offsets)
    assert sorted(p.name for p in path.iterdir()) == ["augmented.bin", "meta.json", "original.bin"]

    # a different augmented model (one weight changed) and a different template: both named in the error
    changed = copy.deepcopy(augmented)
    with torch.no_grad():
        next(changed.parameters()).view(-1)[0] += 1.0
    assert model_fingerprint(changed) != key.augmented
    stale = _key(original, changed, examples, template=template_fingerprint(get_template("phi")))
    with pytest.raises(StaleTeacherCache, match=r"augmented: cache has .* template: cache has"):
        TeacherCache.load(path, stale)
    # different data (one answer token) changes the data fingerprint
    other = copy.deepcopy(examples)
    other[0]["input_ids"][-1] = (other[0]["input_ids"][-1] % 79) + 1
    other[0]["labels"][-1] = other[0]["input_ids"][-1]
    with pytest.raises(StaleTeacherCache, match="data: cache has"):
        TeacherCache.load(path, _key(original, augmented, other))
    with pytest.raises(ValueError, match="examples: 6 given, the cache holds 7"):
        CachedTeacher(loaded, examples[:6])
    with pytest.raises(ValueError, match="indices: must lie in"):  # an example index the cache does not hold
        CachedTeacher(loaded, examples).rows(collate([dict(other[0], index=7)], PAD))
    with pytest.raises(ValueError, match="has no 'index'"):
        CachedTeacher(loaded, examples).rows(collate([{k: v for k, v in other[0].items() if k != "index"}], PAD))
    with pytest.raises(FileNotFoundError, match="meta.json"):
        TeacherCache.load(tmp_path / "nothing")
    # a cache whose dtype differs from what the models produce is refused while building
    with pytest.raises(ValueError, match="cache key says bfloat16"):
        build_forget_cache(model_logits_fn(original, augmented), examples,
                           _key(original, augmented, examples, dtype="bfloat16"), pad_token_id=PAD)


def test_make_teacher_modes_and_reuse(tmp_path):
    from rklu_fast.train.teacher import OnlineTeacher
    from rklu_fast.train.teacher_cache import make_teacher
    original, augmented = _models(2)
    examples = _examples(2)
    kw = dict(template=get_template("llama2"), pad_token_id=PAD, device="cpu", micro_batch_size=3)
    assert isinstance(make_teacher("online", original, augmented, examples, **kw), OnlineTeacher)
    auto = make_teacher("auto", original, augmented, examples, **kw)  # a few kB: fits in memory
    assert isinstance(auto, CachedTeacher)
    on_disk = make_teacher("cached", original, augmented, examples, cache_dir=tmp_path / "c", **kw)
    batch = collate(examples[:3], PAD)
    for a, b in zip(auto.rows(batch)[:2], on_disk.rows(batch)[:2]):
        assert torch.equal(a, b)
    # a second run with the same models reuses the directory; other models are refused, naming the field
    again = make_teacher("cached", original, augmented, examples, cache_dir=tmp_path / "c", **kw)
    assert torch.equal(again.cache.original, on_disk.cache.original)
    with pytest.raises(StaleTeacherCache, match="original: cache has"):
        make_teacher("cached", augmented, augmented, examples, cache_dir=tmp_path / "c", **kw)
    with pytest.raises(ValueError, match="teacher.mode: must be one of"):
        make_teacher("sometimes", original, augmented, examples, **kw)


@pytest.mark.parametrize("on_disk", [False, True])
def test_combined_cache_is_the_teacher_rounded_once(tmp_path, on_disk):
    """One tensor l_t instead of (l_o, l_aug): half the bytes; in fp32 the loss equals the pair cache's to fp32
    rounding; in bf16 each cached teacher logit is within half a bf16 ulp of the fp32-formed teacher, and the loss
    moves by at most 2·max|δl_t| (a shift δ of the teacher's logits moves log q by at most 2·max|δ|)."""
    import dataclasses

    seed = int(torch.seed() % 2**31)
    original, augmented = _models(seed)
    examples = _examples(seed)
    pair_key = _key(original, augmented, examples)
    combined_key = dataclasses.replace(pair_key, store="combined", alpha=8.0)
    online = model_logits_fn(original, augmented)
    pair = build_forget_cache(online, examples, pair_key, pad_token_id=PAD, micro_batch_size=3)
    combined = build_forget_cache(online, examples, combined_key, pad_token_id=PAD, micro_batch_size=3,
                                  path=tmp_path / "c" if on_disk else None)
    assert combined.augmented is None and combined.nbytes() * 2 == pair.nbytes()
    batch = collate(examples[2:6], PAD)
    student = torch.randn(4, batch["input_ids"].shape[1] - 1, 80, requires_grad=True)
    labels = batch["labels"][:, 1:]
    o, a = pair.rows(batch["index"])
    t, none = combined.rows(batch["index"])
    assert none is None
    loss_pair = rklu_fast.reverse_kl_loss(student, o, a, alpha=8.0, labels=labels, teacher_rows="valid")
    loss_comb = rklu_fast.reverse_kl_loss(student, t, None, labels=labels, teacher_rows="valid")
    torch.testing.assert_close(loss_comb, loss_pair, rtol=1e-6, atol=1e-6)
    # bf16: one extra rounding of l_t, bounded
    exact = rklu_fast.teacher_logits(o, a, 8.0)
    bf16_key = dataclasses.replace(combined_key, dtype="bfloat16")
    to_bf16 = lambda b: tuple(x.to(torch.bfloat16) for x in online(b))  # noqa: E731
    bf16 = build_forget_cache(to_bf16, examples, bf16_key, pad_token_id=PAD, micro_batch_size=3)
    t16 = bf16.rows(batch["index"])[0].float()
    exact16 = rklu_fast.teacher_logits(o.to(torch.bfloat16), a.to(torch.bfloat16), 8.0)  # formed in fp32
    half_ulp = torch.finfo(torch.bfloat16).eps / 2 * exact16.abs()
    assert bool(((t16 - exact16).abs() <= half_ulp + 1e-6).all())
    delta = (t16 - exact).abs().max()
    loss16 = rklu_fast.reverse_kl_loss(student, t16, None, labels=labels, teacher_rows="valid")
    assert abs(float((loss16 - loss_pair).detach())) <= 2 * float(delta) + 1e-6
    if on_disk:  # a combined cache for another α is stale
        with pytest.raises(StaleTeacherCache, match="alpha: cache has 8.0, run needs 4.0"):
            TeacherCache.load(tmp_path / "c", dataclasses.replace(combined_key, alpha=4.0))
        assert sorted(p.name for p in (tmp_path / "c").iterdir()) == ["meta.json", "teacher.bin"]
