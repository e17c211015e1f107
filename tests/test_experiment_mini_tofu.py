"""The mini-TOFU experiment end to end at toy size (a tiny model, a few real TOFU questions, two methods, one epoch),
its selection rule on hand-made curves, and its forget quality against an independent KS test."""
import json
from pathlib import Path

import pytest
from scipy.stats import ks_2samp

from rklu_fast.data import load_tofu
from rklu_fast.jsonio import finite
from rklu_fast.experiments.selection import best_grid_point, best_utility_above, selected_epoch
from tiny_pipeline import needs_tofu, overrides, tokenizer_dir

ROWS = {"forget01": 8, "forget01_perturbed": 6, "retain99": 8, "retain_perturbed": 4, "idontknow": 5}


def test_selected_epoch_is_the_first_epoch_at_the_maximum():
    curve = [{"epoch": 0, "forget_quality": 0.9}, {"epoch": 1, "forget_quality": 1e-9},
             {"epoch": 2, "forget_quality": 0.3}, {"epoch": 3, "forget_quality": 0.3},
             {"epoch": 4, "forget_quality": 0.01}]
    assert selected_epoch(curve)["epoch"] == 2  # epoch 0 excluded; ties go to the earlier epoch
    with pytest.raises(ValueError, match="no epoch"):
        selected_epoch(curve[:1])


def test_best_utility_above_the_threshold():
    curve = [{"epoch": 0, "forget_quality": 0.9, "utility": 0.9},
             {"epoch": 1, "forget_quality": 0.04, "utility": 0.8},   # below 0.05: not eligible
             {"epoch": 2, "forget_quality": 0.06, "utility": 0.5},
             {"epoch": 3, "forget_quality": 0.2, "utility": 0.6},
             {"epoch": 4, "forget_quality": 0.3, "utility": None}]   # no generations at this epoch
    assert best_utility_above(curve)["epoch"] == 3
    assert best_utility_above(curve, threshold=0.5) is None


def test_best_grid_point_prefers_forget_quality_then_utility():
    runs = [{"lr": 1e-4, "selected": {"forget_quality": 0.2, "utility": 0.3}},
            {"lr": 3e-4, "selected": {"forget_quality": 0.2, "utility": 0.5}},
            {"lr": 1e-3, "selected": {"forget_quality": 0.1, "utility": 0.9}}]
    assert best_grid_point(runs)["lr"] == 3e-4


def test_nonfinite_values_become_null_with_a_flag():
    out = finite({"a": float("nan"), "b": 1.0, "c": {"d": [1.0, float("inf")]}})
    assert out == {"a": None, "b": 1.0, "c": {"d": [1.0, None], "nonfinite": True}, "nonfinite": True}
    json.dumps(out, allow_nan=False)  # valid JSON


@pytest.fixture(scope="module")
def toy_data(tmp_path_factory):
    """A TOFU folder with the first rows of the splits the toy experiment reads (real TOFU text)."""
    d = tmp_path_factory.mktemp("toy-tofu")
    for split, n in ROWS.items():
        if split == "idontknow":
            from rklu_fast.data.refusals import load_refusals
            (d / "idontknow.jsonl").write_text("\n".join(load_refusals(None)[:n]) + "\n")
            continue
        with open(d / f"{split}.jsonl", "w") as f:
            for r in load_tofu(split)[:n]:
                f.write(json.dumps(r) + "\n")
    return d


def toy_overrides(tmp_path, toy_data, methods: str, unlearn_epochs: int) -> list[str]:
    """Overrides of a toy experiment in ``tmp_path/exp`` (report in ``tmp_path/report``): a tiny model, a few
    real TOFU rows, one lr, one seed, one job at a time; ``methods``: the YAML of its methods (and plans)."""
    experiment = (f"{{{methods}, lrs: [1.0e-2], seeds: [0], jobs: 1, forget_rows: 6, retain_rows: 4, leak_rows: 2, "
                  f"eval_batch_size: 4, max_new_tokens: 6, out_dir: {tmp_path / 'report'}, "
                  "require_informative: false, name: toy}")
    ov = overrides(tmp_path / "exp", **{"data.source": str(toy_data), "data.retain": "retain99",
                                        "finetune.epochs": 1, "augment.epochs": 1, "unlearn.epochs": unlearn_epochs,
                                        "experiment": experiment})
    return [o for o in ov if not o.startswith("model.tokenizer=")] + [f"model.tokenizer={tokenizer_dir()}"]


@needs_tofu
def test_toy_experiment_writes_the_report(tmp_path, toy_data, monkeypatch, capsys):
    from rklu_fast.cli import main

    out = tmp_path / "report"
    ov = toy_overrides(tmp_path, toy_data, "methods: [rklu+RT, ga+RT, ta]", unlearn_epochs=1)
    assert main(["experiment", "mini-tofu", "--config", "configs/mini-tofu.yaml", *ov]) == 0
    stems = list(out.glob("toy_*.json"))
    assert len(stems) == 1
    stem = str(stems[0])[:-5]
    for suffix in (".md", ".png", "_curves.png"):
        assert Path(stem + suffix).is_file()
    data = json.loads(Path(stem + ".json").read_text())
    assert {j["job"] for j in data["jobs"]} == {"rklu+RT_lr0.01_seed0", "ga+RT_lr0.01_seed0", "ta"}
    for j in data["jobs"]:
        assert j["command"].startswith("rklu experiment mini-tofu --config configs/mini-tofu.yaml")
        assert j["machine"]["cores"] >= 1 and j["selected"]["utility"] is not None
        if j["trains"]:
            assert [p["epoch"] for p in j["epochs"]] == [0, 1]
            assert "leak_rate" in j["selected"] and j["epochs"][1]["train_seconds"] > 0
    # forget quality is the KS test of the forget truth ratios against the oracle's, on the rows evaluated
    ref = json.loads((tmp_path / "exp" / "results" / "reference.json").read_text())
    assert ref["original"]["forget_quality"] == pytest.approx(
        ks_2samp(ref["original"]["stat"], ref["oracle"]["stat"]).pvalue)
    assert ref["oracle"]["forget_quality"] == pytest.approx(1.0)
    md = Path(stem + ".md").read_text()
    assert "| rklu+RT | 0.01 |" in md and "| original |" in md
    # a rerun skips the finished jobs and rewrites the same report
    assert main(["experiment", "mini-tofu", "--config", "configs/mini-tofu.yaml", *ov]) == 0
    # the cached shared models are not reused under another recipe (the error names the key); how a step is split
    # into micro-batches is not part of the recipe
    capsys.readouterr()
    assert main(["experiment", "mini-tofu", "--config", "configs/mini-tofu.yaml", *ov, "finetune.lr=0.5"]) == 2
    assert "changed: finetune.lr)" in capsys.readouterr().err
    config = (tmp_path / "exp" / "models" / "config.yaml").read_text()
    assert main(["experiment", "mini-tofu", "--config", "configs/mini-tofu.yaml", *ov,
                 "finetune.micro_batch_size=1"]) == 0
    assert (tmp_path / "exp" / "models" / "config.yaml").read_text() == config  # still the one they were made with


@needs_tofu
def test_a_diverging_job_is_reported_with_the_epochs_it_reached(tmp_path, toy_data, monkeypatch):
    """A loss going non-finite in epoch 2 stops that job's training, not the experiment: its result holds epochs
    0 and 1 and says it diverged, the report marks it, and a rerun does not train it again; the recorded command
    names the plan, so it reruns as written."""
    from rklu_fast.cli import main
    from rklu_fast.train.loop import NonFiniteError
    from rklu_fast.train.pipeline import Run

    unlearn = Run.unlearn
    calls = []

    def diverging(self, on_epoch=None, **kw):
        def hook(epoch, model):
            on_epoch(epoch, model)
            if epoch == 1:
                raise NonFiniteError("step 9: the forget term of 'ga' is inf (method 'ga')")
        calls.append(1)
        return unlearn(self, on_epoch=hook if on_epoch else None, **kw)
    monkeypatch.setattr(Run, "unlearn", diverging)
    out = tmp_path / "report"
    ov = toy_overrides(tmp_path, toy_data, "methods: [ta], plans: {one: [ga+RT]}", unlearn_epochs=2)
    args = ["experiment", "mini-tofu", "--config", "configs/mini-tofu.yaml", "--plan", "one", *ov]
    assert main(args) == 0
    result = json.loads((tmp_path / "exp" / "results" / "ga+RT_lr0.01_seed0.json").read_text())
    assert "is inf" in result["diverged"] and [p["epoch"] for p in result["epochs"]] == [0, 1]
    assert result["selected"]["epoch"] == 1 and result["selected"]["utility"] is not None
    assert " --plan one --job " in result["command"]
    md = next(out.glob("toy_*.md")).read_text()
    assert "| ga+RT (diverged after epoch 1) | 0.01 |" in md
    n = len(calls)
    assert main(args) == 0 and len(calls) == n  # finished, diverged or not: not trained again
    # results evaluated on other rows cannot stand next to new ones: refused before anything runs
    assert main([*args, "experiment.retain_rows=3"]) == 2 and len(calls) == n


def test_seed_summary_hand_computed():
    """Geometric mean of forget quality and mean utility over the seeds at one lr; a label seeded at two lrs
    gets one row per lr; a label run at one seed gets none."""
    from rklu_fast.experiments.report import seed_summary

    def job(label, lr, seed, fq, u, above=None):
        return {"label": label, "spec": label, "lr": lr, "seed": seed,
                "selected": {"forget_quality": fq, "utility": u},
                "best_utility_above_0.05": None if above is None else {"utility": above}}
    jobs = [job("a", 1e-4, 0, 1e-2, 0.5, 0.4), job("a", 1e-4, 1, 1e-4, 0.7, 0.6), job("a", 3e-4, 0, 0.9, 0.1),
            job("b", 1e-4, 0, 0.1, 0.2), job("b", 1e-4, 1, 0.4, 0.4, 0.3),
            job("b", 3e-4, 0, 1e-6, 0.3), job("b", 3e-4, 2, 1e-8, 0.5), job("c", 1e-4, 0, 0.2, 0.2)]
    out = seed_summary(jobs)
    assert sorted(out) == ["a", "b (lr 0.0001)", "b (lr 0.0003)"]
    a = out["a"]
    assert a["lr"] == 1e-4 and a["seeds"] == [0, 1]
    assert a["fq_geomean"] == pytest.approx(1e-3) and (a["fq_min"], a["fq_max"]) == (1e-4, 1e-2)
    assert a["utility_mean"] == pytest.approx(0.6) and a["best_utility_above_mean"] == pytest.approx(0.5)
    assert out["b (lr 0.0001)"]["fq_geomean"] == pytest.approx(0.2)
    assert out["b (lr 0.0001)"]["best_utility_above_mean"] is None  # seed 0 never got above 0.05
    assert out["b (lr 0.0003)"]["fq_geomean"] == pytest.approx(1e-7) and out["b (lr 0.0003)"]["seeds"] == [0, 2]
