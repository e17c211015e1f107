"""TOFU aggregation golden-tested on TOFU's official Llama-2-7b logs, plus hand-computed formulas and bad inputs."""
import copy
import json
import math
from pathlib import Path

import numpy as np
import pytest
from scipy.stats import hmean, ks_2samp

from rklu_fast.data import get_template, load_tofu
from rklu_fast.data.tofu import default_data_dir
from rklu_fast.eval import aggregate
from rklu_fast.eval.aggregate import (SECTIONS, forget_quality, load_scores, model_utility, normalised_probability,
                                      truth_ratio_score, truth_ratio_stat)
from rklu_fast.eval.rouge import rouge_scores

LOGS = default_data_dir("tofu_eval_logs") or Path("../shared/data/tofu_eval_logs")  # $RKLU_DATA_DIR or ../shared
FULL, RETAIN = LOGS / "llama2-7b_full_wd0.01.json", LOGS / "llama2-7b_retain90_wd0.01.json"
needs_logs = pytest.mark.skipif(not FULL.is_file(), reason=f"TOFU's official logs not found in {LOGS}")
SPLIT_OF_SECTION = {"eval_log.json": "retain_perturbed", "eval_log_forget.json": "forget10_perturbed",
                    "eval_real_author_wo_options.json": "real_authors_perturbed",
                    "eval_real_world_wo_options.json": "world_facts_perturbed"}


@pytest.fixture(scope="module")
def full_log():
    return json.loads(FULL.read_text())


@pytest.fixture(scope="module")
def retain_log():
    return json.loads(RETAIN.read_text())


@needs_logs
def test_golden_model_utility_and_forget_quality():
    full = aggregate(FULL, RETAIN)
    assert round(full["model_utility"], 4) == 0.6227
    assert round(aggregate(RETAIN)["model_utility"], 4) == 0.6137
    assert full["forget_quality"] == pytest.approx(1.834e-21, rel=1e-3)
    assert len(full["parts"]) == 9 and full["forget_samples"] == 300


@needs_logs
def test_every_logged_rouge_recomputes_exactly(full_log, retain_log):
    n = 0
    for log in (full_log, retain_log):
        for section in log.values():
            for idx, (_prompt, generation, gold) in section["generated_text"].items():
                s = rouge_scores(gold, generation)
                assert abs(s["rougeL_recall"] - section["rougeL_recall"][idx]) <= 1e-9
                assert abs(s["rouge1_recall"] - section["rouge1_recall"][idx]) <= 1e-9
                n += 1
    assert n == 2 * (300 + 300 + 100 + 117)


@needs_logs
def test_logged_prompts_and_golds_equal_template_rendering(full_log):
    template = get_template("llama2")
    for name, split in SPLIT_OF_SECTION.items():
        rows = load_tofu(split)
        texts = full_log[name]["generated_text"]
        assert len(texts) == min(300, len(rows))
        for idx, (prompt, _gen, gold) in texts.items():
            assert prompt == template.prompt(rows[int(idx)]["question"])
            assert gold == rows[int(idx)]["answer"]


@needs_logs
def test_open_unlearning_format_gives_the_same_numbers(full_log, retain_log):
    """open-unlearning stores the truth ratio inverted (P(perturbed)/P(paraphrased) = 1/s); reading it must give
    TOFU's numbers. The file is built from the official logs the way open-unlearning computes each metric."""
    def to_open_unlearning(log):
        out = {}
        for split, prefix in (("retain", "retain"), ("real_authors", "ra"), ("world_facts", "wf"),
                              ("forget", "forget")):
            sec = log[SECTIONS[split]]
            idx = sorted(sec["avg_gt_loss"], key=int)
            gt = np.array([sec["avg_gt_loss"][i] for i in idx])
            para = np.array([sec["avg_paraphrased_loss"][i] for i in idx])
            pert = np.array([sec["average_perturb_loss"][i] for i in idx])
            wrong, correct = np.exp(-pert.mean(-1)), np.exp(-para)
            tr = wrong / (correct + 1e-10)
            tr_name = "forget_truth_ratio" if split == "forget" else f"{prefix}_Truth_Ratio"
            out[tr_name] = {"value_by_index": {i: {"score": float(v)} for i, v in zip(idx, tr)}}
            if split in ("retain", "forget"):
                out[f"{prefix}_Q_A_Prob"] = {"value_by_index": {i: {"prob": float(np.exp(-g)), "avg_loss": float(g)}
                                                                for i, g in zip(idx, gt)}}
            else:
                probs = np.exp(-gt) / (np.exp(-gt) + np.exp(-pert).sum(-1) + 1e-10)
                out[f"{prefix}_Q_A_Prob_normalised"] = {"value_by_index": {i: {"prob": float(p)}
                                                                           for i, p in zip(idx, probs)}}
            out[f"{prefix}_Q_A_ROUGE"] = {"value_by_index": {
                i: {"rougeL_recall": sec["rougeL_recall"][i], "input": sec["generated_text"][i][0]} for i in idx}}
        return out

    ours = aggregate(to_open_unlearning(full_log), to_open_unlearning(retain_log))
    tofu = aggregate(full_log, retain_log)
    assert ours["model_utility"] == pytest.approx(tofu["model_utility"], rel=1e-6)
    assert ours["forget_quality"] == pytest.approx(tofu["forget_quality"], rel=1e-6)
    assert ours["forget_truth_ratio"] == pytest.approx(tofu["forget_truth_ratio"], rel=1e-6)


@needs_logs
def test_mismatched_logs_are_refused(full_log, retain_log):
    fewer = copy.deepcopy(retain_log)
    for metric in fewer["eval_log_forget.json"].values():
        for k in [k for k in metric if int(k) >= 200]:
            del metric[k]
    with pytest.raises(ValueError, match="different forget splits"):
        aggregate(full_log, fewer)
    other = copy.deepcopy(retain_log)
    other["eval_log_forget.json"]["generated_text"]["7"][0] = "[INST] Who else? [/INST]"
    with pytest.raises(ValueError, match="sample 7 asks different questions"):
        aggregate(full_log, other)


@needs_logs
def test_incomplete_logs_give_clear_errors(full_log):
    no_world = {k: v for k, v in full_log.items() if k != "eval_real_world_wo_options.json"}
    with pytest.raises(ValueError, match="world_facts"):
        aggregate(no_world)
    no_forget = {k: v for k, v in full_log.items() if k != "eval_log_forget.json"}
    with pytest.raises(ValueError, match="model_log: has no forget-split"):
        aggregate(no_forget, full_log)
    empty = copy.deepcopy(full_log)
    empty["eval_log.json"]["avg_gt_loss"] = {}
    with pytest.raises(ValueError, match="'avg_gt_loss' is empty"):
        aggregate(empty)
    no_generations = copy.deepcopy(full_log)
    no_generations["eval_log_forget.json"]["generated_text"] = {}
    with pytest.raises(ValueError, match="'generated_text' is empty"):
        aggregate(no_generations)
    short = copy.deepcopy(full_log)
    del short["eval_log.json"]["rougeL_recall"]["5"]
    with pytest.raises(ValueError, match="different numbers of samples"):
        aggregate(short)
    with pytest.raises(FileNotFoundError, match="no such file"):
        aggregate("/nonexistent/eval_log_aggregated.json")
    with pytest.raises(TypeError, match="JSON object"):
        load_scores([1, 2])


def test_formulas_on_hand_computed_values():
    # Three samples; losses chosen so every quantity has a closed form.
    para = np.array([1.0, 2.0, 0.5])
    pert = np.array([[2.0, 3.0], [2.0, 2.0], [0.5, 1.5]])
    s = truth_ratio_stat(para, pert)
    np.testing.assert_allclose(s, [math.e ** 1.5, 1.0, math.e ** 0.5], rtol=1e-15)
    assert truth_ratio_score(s, forget=True) == pytest.approx((math.e ** -1.5 + 1 + math.e ** -0.5) / 3, rel=1e-14)
    assert truth_ratio_score(s, forget=False) == pytest.approx(((1 - math.e ** -1.5) + 0 + (1 - math.e ** -0.5)) / 3,
                                                               rel=1e-14)
    # s < 1 (the model prefers the wrong answers) counts as 0 for retain-type splits, not negative.
    assert truth_ratio_score([0.5], forget=False) == 0.0
    # P(a) = 1/4 and the perturbed answers 1/8 and 1/8 → normalised 1/2.
    np.testing.assert_allclose(normalised_probability([math.log(4)], [[math.log(8), math.log(8)]]), [0.5])
    parts = {str(i): v for i, v in enumerate([0.5, 0.25, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0])}
    assert model_utility(parts) == pytest.approx(9 / (2 + 4 + 7))
    assert model_utility({**parts, "0": 0.0}) == 0.0
    with pytest.raises(ValueError, match="9 values"):
        model_utility({"a": 1.0})


def test_forget_quality_is_scipys_ks_pvalue():
    rng = np.random.default_rng(1234)
    a, b = rng.lognormal(0.0, 1.0, 300), rng.lognormal(0.3, 1.2, 300)
    assert forget_quality(a, b) == ks_2samp(a, b).pvalue
    assert forget_quality(a, a) == 1.0
    assert model_utility(dict(enumerate(rng.uniform(0.1, 1, 9)))) > 0
    x = rng.uniform(0.1, 1, 9)
    assert model_utility(dict(enumerate(x))) == pytest.approx(hmean(x), rel=1e-14)


def test_rouge_rejects_bad_inputs():
    assert rouge_scores("Paris", "")["rougeL_recall"] == 0.0  # an empty generation is a valid (bad) answer
    with pytest.raises(ValueError, match="gold: empty"):
        rouge_scores("  ", "Paris")
    with pytest.raises(TypeError, match="gold/generated"):
        rouge_scores("Paris", None)
