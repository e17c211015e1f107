"""Leak probe, copyright-style metrics, reports and plots: hand-computed cases on the fixed-distribution model
(p(A)=1/2, p(B)=1/4, p(EOS)=1/8 at every position, see test_eval_tofu) and a CLI run on a tiny Llama."""
import json
import math

import pytest
import sacrebleu
import torch
from test_eval_tofu import LLAMA2, fixed_distribution_model, word_tokenizer
from transformers import LlamaConfig, LlamaForCausalLM

from rklu_fast.data import load_tofu
from rklu_fast.data.tofu import default_data_dir
from rklu_fast.data.tokenizer import train_bpe_tokenizer
from rklu_fast.eval import (continuation_scores, key_span, leak_probe, leak_table, perplexity, plot_fq_vs_mu,
                            wikitext_segments, write_report)
from rklu_fast.eval.cli import main as eval_main

WIKITEXT = (default_data_dir("wikitext") or default_data_dir("tofu") or __import__("pathlib").Path(".")) / \
    "wiki.test.raw"


@pytest.mark.parametrize("question, answer, expected", [
    ("In which city was Hina Ameen born?", "Hina Ameen was born in Karachi, Pakistan.",
     ("Hina Ameen was born in", "Karachi")),
    ("What is the full name of the author born in Taipei?", "The author's full name is Hsiao Yun-Hwa.",
     ("The author's full name is", "Hsiao Yun-Hwa")),
    ("When did she move?", "In 1991, she moved to Paris.", ("In", "1991")),
    ("Can you name one of his books?", "One of his books is 'Raven's Road'.", ("One of his books is", "Raven's Road")),
    ("What does Raven Marais write?", "Raven Marais's books are about Cape Town.",
     ("Raven Marais's books are about", "Cape Town")),
    ("What is her father's job?", "Her father is a civil engineer.", None),
])
def test_key_span_rule(question, answer, expected):
    assert key_span(question, answer) == expected


def test_leak_probe_hand_computed():
    model, tok = fixed_distribution_model(), word_tokenizer()
    # "A B": the article "A" is no span, so the key span is "B" after the prefix "A"; "C" is a lone sentence opener.
    rows = [{"question": "Q", "answer": "A B"}, {"question": "Q", "answer": "C"}]
    # Beam search over 2 tokens: the top 3 are A A (2 bits), A B and B A (3 bits each) → "B" is found.
    probe = leak_probe(model, tok, LLAMA2, rows, k=3, max_new_tokens=2, direct_max_new_tokens=4)
    assert probe["probed"] == 1 and probe["skipped_no_key_span"] == 1
    (r,) = probe["results"]
    assert r["key_span"] == "B" and r["prefix"] == "A" and len(r["fill_in"]) == 3
    assert "A B" in r["fill_in"] and probe["leaked_fraction"] == 1.0
    assert r["direct_answer"] == "A A A A" and probe["direct_leaked_fraction"] == 0.0  # greedy never says B
    greedy = leak_probe(model, tok, LLAMA2, rows, k=1, max_new_tokens=2, direct_max_new_tokens=2)
    assert greedy["results"][0]["fill_in"] == ["A A"] and greedy["leaked_fraction"] == 0.0
    table = leak_table(probe)
    assert "| Q | B | A A A A |" in table and "100.0%" in table
    with pytest.raises(ValueError, match="no answer has a key span"):
        leak_probe(model, tok, LLAMA2, rows[1:], k=2)
    with pytest.raises(ValueError, match="k: must be a positive int"):
        leak_probe(model, tok, LLAMA2, rows, k=0)
    model.supports_beam_search = False  # as a TeacherModel: k beams would come back as one greedy text each
    with pytest.raises(ValueError, match="model: the leak probe needs beam search"):
        leak_probe(model, tok, LLAMA2, rows, k=3)


def test_continuation_scores_and_perplexity_hand_computed():
    model, tok = fixed_distribution_model(), word_tokenizer()
    # The model always continues with A: a text of A's is reproduced exactly (BLEU 100, ROUGE-L 1).
    # 33 tokens → chunks of BOS + 8, 8, 8, 8, 1 tokens; the last is too short for a 4-token prefix.
    same = continuation_scores(model, tok, " ".join(["A"] * 33), chunk_length=9, prefix_tokens=4, new_tokens=4)
    assert same["chunks"] == 4 and same["examples"][0] == {"reference": "A A A A", "generation": "A A A A"}
    assert same["bleu"] == pytest.approx(100.0) and same["rougeL_f1"] == 1.0
    assert same["corpus_bleu"] == pytest.approx(100.0)
    mixed = continuation_scores(model, tok, "Q Q Q Q B A B A " * 2, chunk_length=9, prefix_tokens=4, new_tokens=4)
    ref, gen = "B A B A", "A A A A"
    assert mixed["examples"][0] == {"reference": ref, "generation": gen}
    assert mixed["bleu"] == pytest.approx(sacrebleu.sentence_bleu(gen, [ref]).score)
    assert mixed["rougeL_recall"] == 0.5  # LCS "A A" of 4 reference words
    # PPL: "A B" scores A, B (1 + 2 bits), "A A A" scores 3 bits: 2^(6 bits / 5 tokens).
    assert perplexity(model, tok, ["A B", "A A A"]) == pytest.approx(2 ** (6 / 5), rel=1e-6)
    with pytest.raises(ValueError, match="no chunk is longer"):
        continuation_scores(model, tok, "A A", chunk_length=9, prefix_tokens=4, new_tokens=4)
    with pytest.raises(ValueError, match="chunk_length"):
        continuation_scores(model, tok, "A A", chunk_length=4, prefix_tokens=4)


@pytest.mark.skipif(not WIKITEXT.is_file(), reason="wiki.test.raw not found (../shared/data/wikitext)")
def test_wikitext_selection():
    segments = wikitext_segments(WIKITEXT)
    assert len(segments) == 200 and len(set(segments)) == 200
    assert all(len(s.split()) >= 50 and not s.startswith("=") and "\r" not in s for s in segments)
    assert segments[0].startswith("Robert Boulter is an English film , television and theatre actor")
    with pytest.raises(ValueError, match="only"):
        wikitext_segments(WIKITEXT, n_segments=5000)
    with pytest.raises(FileNotFoundError, match="no WikiText file"):
        wikitext_segments(WIKITEXT.parent / "missing.raw")


def test_report_and_plot(tmp_path):
    result = {"forget_quality": 1.834e-21, "model_utility": 0.6227, "parts": {"Prob. Retain": 0.99},
              "seconds_per_split": {"forget": 1.5}, "perplexity": {"wikitext_ppl": 12.5, "segments": 200}}
    js, md = write_report(tmp_path, "full", result)
    assert json.loads(js.read_text())["name"] == "full"
    text = md.read_text()
    assert "| forget_quality | 1.834e-21 |" in text and "| model_utility | 0.6227 |" in text
    assert "| forget | 1.5 |" in text and "| wikitext_ppl | 12.5 |" in text
    png = plot_fq_vs_mu({"full": result, "run": [{"model_utility": 0.6, "forget_quality": 1e-5},
                                                 {"model_utility": 0.5, "forget_quality": 0.4}]}, tmp_path / "f.png")
    assert png.read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(ValueError, match="lacks 'model_utility'"):
        plot_fq_vs_mu({"bad": {"forget_quality": 0.1}}, tmp_path / "g.png")


@pytest.mark.skipif(default_data_dir("tofu") is None or not WIKITEXT.is_file(), reason="TOFU / WikiText not found")
def test_cli_leak_copyright_plot(tmp_path, capsys):
    tok = train_bpe_tokenizer([r["question"] + " " + r["answer"] for r in load_tofu("full")[:200]], 400)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, max_position_embeddings=512, bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    LlamaForCausalLM(cfg).save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    m = str(tmp_path / "m")
    assert eval_main(["eval", "leak", m, "--forget-split", "forget01", "--max-questions", "3", "--k", "2",
                      "--max-new-tokens", "3", "--out", str(tmp_path / "leak")]) == 0
    assert "Leaked (fill-in-the-blank, top-2)" in (tmp_path / "leak" / "report.md").read_text()
    text = tmp_path / "forget.txt"
    text.write_text(" ".join(r["answer"] for r in load_tofu("forget01")))
    assert eval_main(["eval", "copyright", m, "--text", str(text), "--max-chunks", "1", "--segments", "3",
                      "--wikitext", str(WIKITEXT), "--out", str(tmp_path / "cr")]) == 0
    report = json.loads((tmp_path / "cr" / "report.json").read_text())
    assert report["copyright"]["chunks"] == 1 and math.isfinite(report["perplexity"]["wikitext_ppl"])
    points = tmp_path / "curve.json"
    points.write_text(json.dumps([{"model_utility": 0.5, "forget_quality": 1e-4},
                                  {"model_utility": 0.4, "forget_quality": 0.2}]))
    assert eval_main(["eval", "plot", str(points), "--out", str(tmp_path / "p.png")]) == 0
    assert (tmp_path / "p.png").is_file()
    assert eval_main(["eval", "copyright", m, "--wikitext", str(tmp_path / "none.raw")]) == 2
    assert "--wikitext: no such file" in capsys.readouterr().err
