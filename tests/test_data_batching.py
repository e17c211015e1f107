"""Padding/collation, plain-text chunks, and the offline BPE tokenizer."""
import pytest
from transformers import AutoTokenizer

from rklu_fast.data.chunks import chunk_text
from rklu_fast.data.collate import collate, target_mask
from rklu_fast.data.tokenizer import load_or_train_tokenizer, train_bpe_tokenizer
from tiny_pipeline import tokenizer_dir


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(tokenizer_dir())


def test_collate_pads_right_and_masks():
    a = {"input_ids": [5, 6, 7], "labels": [-100, 6, 7], "attention_mask": [1, 1, 1]}
    b = {"input_ids": [8], "labels": [8], "attention_mask": [1]}
    batch = collate([a, b], pad_token_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert int(target_mask(batch["labels"]).sum()) == 2  # next-token targets: labels[:, 1:] not ignored


def test_collate_errors():
    with pytest.raises(ValueError, match="examples"):
        collate([], 0)
    with pytest.raises(ValueError, match="pad_token_id"):
        collate([{"input_ids": [1], "labels": [1], "attention_mask": [1]}], None)


def test_chunks_cover_text_in_fixed_lengths(tok):
    text = "Basil Mahfouz Al-Kuwaiti was born in Kuwait City. " * 20
    ids = tok(text, add_special_tokens=False)["input_ids"]
    chunks = chunk_text(tok, text, chunk_length=16)
    assert all(len(c["input_ids"]) == 16 for c in chunks[:-1]) and 2 <= len(chunks[-1]["input_ids"]) <= 16
    assert all(c["input_ids"][0] == tok.bos_token_id and c["labels"][0] == -100 for c in chunks)
    assert [t for c in chunks for t in c["labels"][1:]] == ids  # every text token once, all in the loss
    with pytest.raises(ValueError, match="chunk_length"):
        chunk_text(tok, text, chunk_length=1)


def test_bpe_trains_saves_and_reloads(tmp_path):
    texts = ["[INST] Who is the author? [/INST]The author is Jaime Vasquez."] * 5
    calls = []

    def source():
        calls.append(1)
        return texts

    a = load_or_train_tokenizer(tmp_path / "tok", source, vocab_size=300)
    b = load_or_train_tokenizer(tmp_path / "tok", source, vocab_size=300)  # cached: not retrained
    assert len(calls) == 1
    enc = a(texts[0])["input_ids"]
    assert enc == b(texts[0])["input_ids"] and enc[0] == a.bos_token_id
    assert a.decode(enc, skip_special_tokens=True) == texts[0]
    assert (a.pad_token_id, a.bos_token_id, a.eos_token_id) == (0, 1, 2)
    with pytest.raises(ValueError, match="vocab_size"):
        train_bpe_tokenizer(texts, vocab_size=100)
