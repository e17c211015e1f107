"""Evaluation: TOFU forget quality / model utility (golden-tested on TOFU's official logs), the leak probe,
copyright-style metrics, reports and the forget-quality-vs-utility plot. See docs/evaluation.md."""
from rklu_fast.eval.aggregate import aggregate, forget_quality, load_scores, model_utility
from rklu_fast.eval.copyright import continuation_scores, perplexity, wikitext_segments
from rklu_fast.eval.leak import key_span, leak_probe, leak_table
from rklu_fast.eval.plots import plot_fq_vs_mu
from rklu_fast.eval.report import write_report
from rklu_fast.eval.tofu import evaluate_tofu

__all__ = ["aggregate", "forget_quality", "load_scores", "model_utility", "evaluate_tofu", "key_span",
           "leak_probe", "leak_table", "continuation_scores", "perplexity", "wikitext_segments", "plot_fq_vs_mu",
           "write_report"]
