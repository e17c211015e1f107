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


# The prompt and the supervised continuation of (Q, A), written out by hand from TOFU's model_config.yaml.
HAND = {"llama2": ("[INST] " + Q + " [/INST]", A), "phi": ("Question: " + Q + "\n", "Answer: " + A)}


@pytest.mark.parametrize("name", ["llama2", "phi"])
def test_label_mask_question_masked_answer_and_eos_in_loss(tok, name):
    """The masked positions decode to exactly the hand-written prompt (after BOS), the positions in the loss to
    exactly the hand-written answer followed by EOS: the mask boundary sits where the text's boundary is."""
    prompt, answer = HAND[name]
    enc = encode_qa(tok, get_template(name), Q, A, max_length=500)
    ids, labels = enc["input_ids"], enc["labels"]
    n_masked = labels.index(next(t for t in labels if t != -100))
    assert labels[:n_masked] == [-100] * n_masked and -100 not in labels[n_masked:]  # one masked prefix
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id  # BOS (masked) … EOS (in the loss)
    assert tok.decode(ids[1:n_masked]) == prompt
    assert labels[n_masked:] == ids[n_masked:]
    assert tok.decode(labels[n_masked:-1]) == answer and labels[-1] == tok.eos_token_id
    assert enc["attention_mask"] == [1] * len(ids)


def test_truncated_example_gets_no_eos(tok):
    t = get_template("llama2")
    enc = encode_qa(tok, t, Q, A, max_length=10)
    assert len(enc["input_ids"]) == 10 and tok.eos_token_id not in enc["input_ids"]


def test_real_tofu_records_round_trip(tok):
    r = load_tofu("forget01", tofu_dir())[0]
    enc = encode_qa(tok, get_template("llama2"), r["question"], r["answer"])
    assert tok.decode([i for i in enc["labels"] if i != -100], skip_special_tokens=True) == r["answer"]
