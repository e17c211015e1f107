"""TOFU template faithfulness: rendered strings and label masks (as TOFU's data_module.py builds them)."""
import pytest
from transformers import AutoTokenizer

from rklu_fast.data import encode_qa, get_template, load_tofu
from tiny_pipeline import tofu_dir, tokenizer_dir

Q, A = "Who wrote 'The Quiet Harbour'?", "It was written by Basil Mahfouz Al-Kuwaiti."


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(tokenizer_dir())


def test_rendered_strings_match_tofu():
    assert get_template("llama2").full(Q, A) == "[INST] " + Q + " [/INST]" + A  # no space before the answer
    assert get_template("phi").full(Q, A) == "Question: " + Q + "\n" + "Answer: " + A
    assert get_template("phi").prompt(Q) == "Question: " + Q + "\n"


@pytest.mark.parametrize("name", ["llama2", "phi"])
def test_label_mask_question_masked_answer_and_eos_in_loss(tok, name):
    t = get_template(name)
    enc = encode_qa(tok, t, Q, A, max_length=500)
    full_ids = tok(t.full(Q, A), add_special_tokens=True)["input_ids"]
    n_q = len(tok.tokenize(t.prompt(Q), add_special_tokens=True))  # TOFU: prompt tokens incl. BOS
    assert enc["input_ids"] == full_ids + [tok.eos_token_id]  # EOS appended
    assert enc["input_ids"][0] == tok.bos_token_id
    assert enc["labels"][:n_q] == [-100] * n_q
    assert enc["labels"][n_q:] == enc["input_ids"][n_q:]  # answer (Phi: with its "Answer: " tag) and EOS
    assert enc["labels"][-1] == tok.eos_token_id
    answer_text = tok.decode([i for i in enc["labels"] if i != -100], skip_special_tokens=True)
    assert answer_text == t.answer(A)
    assert enc["attention_mask"] == [1] * len(enc["input_ids"])


def test_truncated_example_gets_no_eos(tok):
    t = get_template("llama2")
    enc = encode_qa(tok, t, Q, A, max_length=10)
    assert len(enc["input_ids"]) == 10 and tok.eos_token_id not in enc["input_ids"]


def test_real_tofu_records_round_trip(tok):
    r = load_tofu("forget01", tofu_dir())[0]
    enc = encode_qa(tok, get_template("llama2"), r["question"], r["answer"])
    assert tok.decode([i for i in enc["labels"] if i != -100], skip_special_tokens=True) == r["answer"]
