"""TOFU evaluation of models: a model whose probabilities are known by construction (every value hand-computed),
and a tiny random Llama run over the real TOFU files on CPU, compared with an unbatched float64 reference."""
import json
import math

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import LlamaConfig, LlamaForCausalLM, PhiConfig, PhiForCausalLM, PreTrainedTokenizerFast

from rklu_fast.data import encode_qa, get_template, load_tofu
from rklu_fast.data.tokenizer import train_bpe_tokenizer
from rklu_fast.eval import aggregate, evaluate_tofu
from rklu_fast.eval.cli import main as eval_main
from rklu_fast.eval.rouge import rouge_scores
from rklu_fast.eval.tofu import answer_losses, tofu_tasks
from tiny_pipeline import needs_tofu, one_thread  # noqa: F401 (one_thread: autouse)

LLAMA2 = get_template("llama2")

# ---- a model whose next-token distribution is fixed: p(A)=1/2, p(B)=1/4, p(EOS)=1/8, the other 9 share 1/8 ----
VOCAB = ["<pad>", "<s>", "</s>", "[", "[/", "INST", "]", "Q", "A", "B", "C", "<unk>"]
P = np.full(len(VOCAB), 1 / 72)
P[VOCAB.index("A")], P[VOCAB.index("B")], P[VOCAB.index("</s>")] = 1 / 2, 1 / 4, 1 / 8
LN2 = math.log(2)


def word_tokenizer():
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(VOCAB)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()  # "[INST] Q [/INST]A B" → [ INST ] Q [/ INST ] A B
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")


def fixed_distribution_model():
    """Phi with every weight 0 except the lm_head bias = log P: the logits are log P at every position."""
    torch.manual_seed(0)
    cfg = PhiConfig(vocab_size=len(VOCAB), hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                    num_attention_heads=2, max_position_embeddings=64, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    model = PhiForCausalLM(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        model.lm_head.bias.copy_(torch.tensor(np.log(P), dtype=torch.float32))
    return model.eval()


def test_three_token_answer_of_known_probability():
    tok, model = word_tokenizer(), fixed_distribution_model()
    enc = encode_qa(tok, LLAMA2, "Q", "A B")
    assert [VOCAB[t] for t in enc["labels"] if t != -100] == ["A", "B", "</s>"]
    sums, counts = answer_losses(model, tok, LLAMA2, ["Q", "Q", "Q"], ["A B", "B B", "A"], batch_size=2)
    np.testing.assert_allclose(sums, [6 * LN2, 7 * LN2, 4 * LN2], rtol=1e-6)
    np.testing.assert_array_equal(counts, [3, 3, 2])
    assert math.exp(-sums[0] / counts[0]) == pytest.approx(0.25, rel=1e-6)  # P̃ = (1/2 · 1/4 · 1/8)^(1/3)


def write_split(folder, name, rows):
    (folder / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_whole_evaluation_hand_computed(tmp_path):
    """Every logged value and MU of the fixed-distribution model, by hand (mean NLLs in units of ln 2)."""
    qa = {"question": "Q", "answer": "A B", "paraphrased_answer": "B B"}
    retain_row = dict(qa, paraphrased_answer="A B A", perturbed_answer=["A A", "B A B"])
    write_split(tmp_path, "retain_perturbed", [retain_row] * 3)
    write_split(tmp_path, "forget01_perturbed", [dict(qa, perturbed_answer=["B B B", "C"])] * 2)
    for name in ("real_authors_perturbed", "world_facts_perturbed"):
        write_split(tmp_path, name, [{"question": "Q", "answer": "A", "perturbed_answer": ["B", "C", "A A"]}] * 2)
    log, seconds = evaluate_tofu(fixed_distribution_model(), word_tokenizer(), LLAMA2, forget_split="forget01",
                                 source=tmp_path, batch_size=2, max_new_tokens=4, out_dir=tmp_path / "out")
    assert set(seconds) == {"retain", "real_authors", "world_facts", "forget", "generation"}
    assert json.loads((tmp_path / "out" / "eval_log_aggregated.json").read_text()) == log

    retain = log["eval_log.json"]
    assert retain["avg_gt_loss"]["0"] == pytest.approx(2 * LN2, rel=1e-6)            # A B </s>: 1+2+3 bits / 3
    assert retain["avg_paraphrased_loss"]["2"] == pytest.approx(7 / 4 * LN2, rel=1e-6)  # A B A </s>: 1+2+1+3
    np.testing.assert_allclose(retain["average_perturb_loss"]["1"], [5 / 3 * LN2, 8 / 4 * LN2], rtol=1e-6)
    assert retain["num_token_perturb"]["0"] == [3, 4]
    # Greedy decoding always picks A (p = 1/2): "A A A A"; ROUGE-L recall of gold "A B" is 1/2.
    assert retain["generated_text"]["0"] == ["[INST] Q [/INST]", "A A A A", "A B"]
    assert retain["rougeL_recall"]["0"] == 0.5
    s_retain = 2 ** ((5 / 3 + 2) / 2 - 7 / 4)                                 # s = exp(mean pert − para)
    assert retain["truth_ratio"]["0"] == pytest.approx(1 / s_retain, rel=1e-6)  # TOFU logs 1/s

    authors = log["eval_real_author_wo_options.json"]
    p_a, p_b, p_c, p_aa = 2 ** -2.0, 2 ** -2.5, 2 ** -((math.log2(72) + 3) / 2), 2 ** -(5 / 3)
    norm = p_a / (p_a + p_b + p_c + p_aa)
    assert authors["normalized_gt_loss"]["0"] == pytest.approx(-math.log(norm), rel=1e-5)

    result = aggregate(log, log)
    parts = result["parts"]
    assert parts["Prob. Retain"] == pytest.approx(0.25, rel=1e-5)
    assert parts["ROUGE Retain"] == 0.5
    assert parts["Truth Ratio Retain"] == pytest.approx(max(0, 1 - 1 / s_retain), rel=1e-5)
    assert parts["Prob. Real Authors"] == pytest.approx(norm, rel=1e-5)
    assert parts["ROUGE Real Authors"] == 1.0  # gold "A" is inside "A A A A"
    s_authors = 2 ** (((2.5 + (math.log2(72) + 3) / 2 + 5 / 3) / 3) - 2)  # para = the answer itself
    assert parts["Truth Ratio Real Authors"] == pytest.approx(1 - 1 / s_authors, rel=1e-5)
    s_forget = 2 ** ((9 / 4 + (math.log2(72) + 3) / 2) / 2 - 7 / 3)  # B B B </s>: 9 bits / 4; C </s>
    assert result["forget_truth_ratio"] == pytest.approx(min(s_forget, 1 / s_forget), rel=1e-5)
    assert result["forget_quality"] == 1.0  # identical logs
    assert result["model_utility"] == pytest.approx(9 / sum(1 / v for v in parts.values()), rel=1e-12)


def test_bad_splits_give_clear_errors(tmp_path):
    model, tok = fixed_distribution_model(), word_tokenizer()
    with pytest.raises(FileNotFoundError, match="no retain_perturbed"):
        evaluate_tofu(model, tok, LLAMA2, source=tmp_path, max_new_tokens=2)
    write_split(tmp_path, "retain_perturbed", [{"question": "Q", "answer": "A", "perturbed_answer": ["B"]}])
    with pytest.raises(ValueError, match="no 'paraphrased_answer'"):
        evaluate_tofu(model, tok, LLAMA2, source=tmp_path, max_new_tokens=2, splits=["retain"])
    with pytest.raises(ValueError, match="forget_split"):
        evaluate_tofu(model, tok, LLAMA2, forget_split="forget20")
    with pytest.raises(ValueError, match="splits: unknown"):
        evaluate_tofu(model, tok, LLAMA2, splits=["holdout"])
    with pytest.raises(ValueError, match="ds_size"):
        evaluate_tofu(model, tok, LLAMA2, ds_size=0)


# ---- a tiny random Llama with a BPE trained offline, on the real TOFU files ----

@pytest.fixture(scope="module")
def tiny():
    texts = [r["question"] + " " + r["answer"] for r in load_tofu("full")[:400]]
    tok = train_bpe_tokenizer(texts, 512)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    return LlamaForCausalLM(cfg).eval(), tok


@needs_tofu
def test_tiny_llama_runs_the_whole_evaluation_on_real_files(tiny, tmp_path):
    model, tok = tiny
    log, seconds = evaluate_tofu(model, tok, LLAMA2, forget_split="forget01", ds_size=3, batch_size=4,
                                 max_new_tokens=4)
    assert list(log) == ["eval_log.json", "eval_real_author_wo_options.json", "eval_real_world_wo_options.json",
                         "eval_log_forget.json"]
    rows = load_tofu("forget01_perturbed")[:3]
    forget = log["eval_log_forget.json"]
    assert all(len(v) == 3 for v in forget.values())
    assert len(forget["perturb_loss"]["0"]) == 5
    assert len(log["eval_real_world_wo_options.json"]["perturb_loss"]["0"]) == 3
    for i, r in enumerate(rows):
        prompt, _gen, gold = forget["generated_text"][str(i)]
        assert prompt == LLAMA2.prompt(r["question"]) and gold == r["answer"]
        # batched float32 losses equal an unbatched float64 forward of the same tokens
        for key, answer in (("gt_loss", r["answer"]), ("paraphrased_loss", r["paraphrased_answer"])):
            enc = encode_qa(tok, LLAMA2, r["question"], answer, max_length=200)
            ids = torch.tensor([enc["input_ids"]])
            with torch.no_grad():
                logits = model.double()(input_ids=ids).logits[0, :-1]
            model.float()
            labels = torch.tensor(enc["labels"][1:])
            ref = torch.nn.functional.cross_entropy(logits, labels, ignore_index=-100, reduction="sum").item()
            assert forget[key][str(i)] == pytest.approx(ref, rel=1e-5)
    result = aggregate(log, log)
    assert all(0 <= v <= 1 for v in result["parts"].values()) and result["forget_quality"] == 1.0


@pytest.mark.parametrize("argv, message", [
    (["tofu", "/no/such/model"], "model: no such folder '/no/such/model'"),
    (["tofu", "runs/none/model"], "model: no such folder 'runs/none/model'"),
    (["leak", "{empty}"], "model: cannot load"),                         # a folder without a model
    (["tofu", "{empty}", "--tokenizer", "./no-tokenizer"], "--tokenizer: no such folder"),
    (["copyright", "{empty}", "--text", "/no/forget.txt"], "--text: no such file"),
    (["copyright", "{empty}", "--wikitext", "/no/wiki.raw"], "--wikitext: no such file"),
    (["plot", "/no/report.json"], "reports: no such file"),
    (["tofu", "{empty}", "--ds-size", "0"], "argument --ds-size: must be a positive integer, got 0"),
    (["tofu", "{empty}", "--batch-size", "two"], "argument --batch-size: must be a positive integer, got 'two'"),
    (["leak", "{empty}", "--k", "-1"], "argument --k: must be a positive integer"),
])
def test_cli_bad_arguments_are_named_before_any_model_loads(argv, message, tmp_path, capsys):
    argv = [a.replace("{empty}", str(tmp_path)) for a in argv]
    try:
        rc = eval_main(["eval", *argv])
    except SystemExit as e:  # argparse's own errors
        rc = e.code
    assert rc == 2
    assert message in capsys.readouterr().err


@needs_tofu
def test_cli_tofu_then_aggregate(tiny, tmp_path, capsys):
    model, tok = tiny
    model.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    out = tmp_path / "eval"
    rc = eval_main(["eval", "tofu", str(tmp_path / "model"), "--forget-split", "forget01", "--ds-size", "2",
                    "--max-new-tokens", "3", "--batch-size", "4", "--out", str(out)])
    assert rc == 0
    assert (out / "eval_log_aggregated.json").is_file() and (out / "report.md").is_file()
    assert json.loads((out / "eval_timing.json").read_text())["seconds_per_split"]["forget"] > 0
    capsys.readouterr()
    log = str(out / "eval_log_aggregated.json")
    assert eval_main(["eval", "aggregate", log, "--retain", log]) == 0
    printed = capsys.readouterr().out
    assert "model_utility:" in printed and "forget_quality: 1" in printed and "Truth Ratio Real World" in printed
    assert eval_main(["eval", "aggregate", log, "--retain", str(tmp_path / "missing.json")]) == 2
    assert "no such file" in capsys.readouterr().err
    assert eval_main(["eval", "tofu", str(tmp_path / "model"), "--retain-log", str(tmp_path / "missing.json")]) == 2
    assert "--retain-log: no such file" in capsys.readouterr().err


@needs_tofu
def test_left_padded_batched_generation_equals_one_at_a_time(tiny):
    from rklu_fast.eval.generate import generate

    model, tok = tiny
    prompts = [LLAMA2.prompt(r["question"]) for r in load_tofu("forget01")[:3]] + [LLAMA2.prompt("Hi?")]
    batched = generate(model, tok, prompts, batch_size=4, max_new_tokens=6)
    single = [generate(model, tok, [p], batch_size=1, max_new_tokens=6)[0] for p in prompts]
    assert batched == single
    assert tok.padding_side == "right"  # restored
    with pytest.raises(ValueError, match="exactly one"):
        generate(model, tok, prompts, max_new_tokens=2, max_length=20)
    with pytest.raises(ValueError, match="nothing to generate"):
        generate(model, tok, [], max_new_tokens=2)


@needs_tofu
def test_fast_path_equals_one_sample_at_a_time(tiny):
    """The fast path (distinct pairs scored once in length-sorted batches; generation in one static-cache chunk)
    equals scoring and generating every sample alone (TOFU's max_length rule: the next test)."""
    model, tok = tiny
    log, _ = evaluate_tofu(model, tok, LLAMA2, forget_split="forget01", ds_size=3, batch_size=2, max_new_tokens=8)
    for task in tofu_tasks("forget01"):
        rows, section = load_tofu(task.data_split)[:3], log[task.section]
        prompts = [tok(LLAMA2.prompt(r["question"]))["input_ids"] for r in rows]
        for i, r in enumerate(rows):
            for key, answers in (("gt_loss", [r["answer"]]), ("paraphrased_loss", [r[task.base_key]]),
                                 ("perturb_loss", r["perturbed_answer"])):
                alone = []
                for a in answers:
                    enc = encode_qa(tok, LLAMA2, r["question"], a, max_length=200)
                    with torch.no_grad():
                        logits = model(input_ids=torch.tensor([enc["input_ids"]])).logits[0, :-1]
                    alone.append(torch.nn.functional.cross_entropy(logits, torch.tensor(enc["labels"][1:]),
                                                                   reduction="sum").item())
                np.testing.assert_allclose(section[key][str(i)], alone if key == "perturb_loss" else alone[0],
                                           rtol=1e-6)
            with torch.no_grad():
                out = model.generate(torch.tensor([prompts[i]]), max_new_tokens=8, do_sample=False,
                                     pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
            text = tok.decode(out[0, len(prompts[i]):], skip_special_tokens=True)
            assert section["generated_text"][str(i)][1] == text
            assert section["rougeL_recall"][str(i)] == rouge_scores(r["answer"], text)["rougeL_recall"]


@needs_tofu
def test_chunked_greedy_generation_keeps_tofus_per_batch_max_length(tiny):
    """One big chunk, rows cut at their budgets == HF's own max_length on each left-padded batch of batch_size."""
    from rklu_fast.eval.generate import generate, left_padding, token_budgets

    model, tok = tiny
    prompts = [LLAMA2.prompt(r["question"]) for r in load_tofu("forget01")[:5]] + [LLAMA2.prompt("Hi?")]
    lengths = [len(tok(p)["input_ids"]) for p in prompts]
    max_length = max(lengths) + 5
    assert token_budgets(lengths, 2, max_length, None) == [max_length - max(lengths[s:s + 2])
                                                           for s in range(0, 6, 2) for _ in range(2)]
    chunked = generate(model, tok, prompts, batch_size=2, chunk_size=6, max_length=max_length)
    expected = []
    with left_padding(tok), torch.no_grad():
        for s in range(0, len(prompts), 2):
            enc = tok(prompts[s:s + 2], padding=True, return_tensors="pt")
            out = model.generate(**enc, max_length=max_length, do_sample=False, pad_token_id=tok.pad_token_id,
                                 eos_token_id=tok.eos_token_id)
            expected += [[t] for t in tok.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)]
    assert chunked == expected


@needs_tofu
def test_cli_evaluates_the_teacher_of_two_models(tiny, tmp_path):
    """``--teacher M M``: with the same model twice, relu(l_aug − l_o) = 0, so the teacher is the model itself and
    its TOFU log (losses through the whole-sequence fallback, greedy text through the teacher's own decoder)
    equals the model's."""
    model, tok = tiny
    model.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    logs = {}
    for name, target in (("plain", [str(tmp_path / "model")]),
                         ("teacher", ["--teacher", str(tmp_path / "model"), str(tmp_path / "model"), "--alpha", "8"])):
        assert eval_main(["eval", "tofu", *target, "--forget-split", "forget01", "--ds-size", "2",
                          "--max-new-tokens", "4", "--batch-size", "4", "--out", str(tmp_path / name)]) == 0
        logs[name] = json.loads((tmp_path / name / "eval_log_aggregated.json").read_text())
    def same(v, w):
        if isinstance(v, list):
            return len(v) == len(w) and all(same(a, b) for a, b in zip(v, w))
        return abs(v - w) <= 1e-5 * max(1.0, abs(v)) if isinstance(v, float) else v == w

    for section, values in logs["plain"].items():
        for metric, per_sample in values.items():
            for i, v in per_sample.items():
                assert same(v, logs["teacher"][section][metric][i]), (section, metric, i)
    assert eval_main(["eval", "tofu", "--forget-split", "forget01"]) == 2  # neither a model nor --teacher
