"""Batched per-example NLL with shared prefixes (``rklu_fast.eval.nll``) against one float64 forward per example."""
import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, PhiConfig, PhiForCausalLM

from rklu_fast.eval.nll import _prefix_groups, _shared_batches, sequence_nll
from tiny_pipeline import one_thread  # noqa: F401 (autouse)

VOCAB, PAD = 97, 0


def tiny_model(kind: str):
    torch.manual_seed(0)
    common = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  max_position_embeddings=128, pad_token_id=PAD)
    if kind == "llama":
        return LlamaForCausalLM(LlamaConfig(num_key_value_heads=2, **common)).double().eval()
    return PhiForCausalLM(PhiConfig(**common)).double().eval()


def qa_examples(rng):
    """Questions each scored with several answers of different lengths (the TOFU pattern), one question with more
    answers than a batch holds, and texts scored from their second token (no prefix to share)."""
    examples = []
    for n_answers in (7, 3, 1, 12):
        question = rng.integers(1, VOCAB, rng.integers(3, 12)).tolist()
        for _ in range(n_answers):
            answer = rng.integers(1, VOCAB, rng.integers(1, 20)).tolist()
            ids = question + answer
            examples.append({"input_ids": ids, "labels": [-100] * len(question) + answer,
                             "attention_mask": [1] * len(ids)})
    for _ in range(3):
        text = rng.integers(1, VOCAB, rng.integers(2, 15)).tolist()
        examples.append({"input_ids": text, "labels": [-100] + text[1:], "attention_mask": [1] * len(text)})
    order = rng.permutation(len(examples))
    return [examples[i] for i in order]


def reference_nll(model, examples):
    sums = []
    with torch.no_grad():
        for e in examples:
            logits = model(input_ids=torch.tensor([e["input_ids"]])).logits[0, :-1]
            sums.append(torch.nn.functional.cross_entropy(logits, torch.tensor(e["labels"][1:]), ignore_index=-100,
                                                          reduction="sum").item())
    return np.array(sums)


@pytest.mark.parametrize("kind", ["llama", "phi"])
@pytest.mark.parametrize("seed", [0, 1])
def test_shared_prefix_equals_one_forward_per_example(kind, seed):
    rng = np.random.default_rng(seed)
    model, examples = tiny_model(kind), qa_examples(rng)
    ref = reference_nll(model, examples)
    counts_ref = [sum(t != -100 for t in e["labels"][1:]) for e in examples]
    for share in (True, False):
        sums, counts = sequence_nll(model, examples, PAD, batch_size=5, share_prefix=share)
        # float64 model, but the softmax runs in float32 by design (TOFU's float32 losses): 1e-6, where a position
        # off by one would be off by O(1)
        np.testing.assert_allclose(sums, ref, rtol=1e-6)
        np.testing.assert_array_equal(counts, counts_ref)


def test_examples_are_grouped_by_their_unscored_prefix():
    rng = np.random.default_rng(2)
    examples = qa_examples(rng)
    batches = _shared_batches(examples, _prefix_groups(examples), 5)
    seen = sorted(i for _, idx, _ in batches for i in idx)
    assert seen == list(range(len(examples)))  # every example exactly once
    for prefixes, idx, owner in batches:
        assert len(idx) <= 5 and len(owner) == len(idx)
        for i, g in zip(idx, owner):
            ids, labels = examples[i]["input_ids"], examples[i]["labels"]
            assert ids[:len(prefixes[g])] == prefixes[g]
            # the prefix stops before the last token the first scored label needs (its logits come from the suffix)
            first_scored = next(t for t, label in enumerate(labels) if label != -100)
            assert len(prefixes[g]) == max(first_scored - 1, 0)
    # a question with more answers than a batch holds runs in pieces, each with its own prefix pass: 7 answers → 2,
    # 3 → 1, 1 → 1, 12 → 3; the 3 texts scored from their second token share the empty prefix → 1
    assert sum(len(prefixes) for prefixes, _, _ in batches) == 2 + 1 + 1 + 3 + 1


def test_a_cache_that_cannot_be_copied_across_rows_falls_back_to_whole_sequences(monkeypatch):
    from transformers import DynamicCache

    owner = next(c for c in DynamicCache.__mro__ if "batch_select_indices" in vars(c))
    monkeypatch.delattr(owner, "batch_select_indices")
    model, examples = tiny_model("llama"), qa_examples(np.random.default_rng(3))
    sums, _ = sequence_nll(model, examples, PAD, batch_size=5)
    np.testing.assert_allclose(sums, reference_nll(model, examples), rtol=1e-6)
