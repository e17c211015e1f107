"""SimNPO: reference-free, length-normalised NPO (Fan et al., NeurIPS 2025; arXiv 2410.07163).

Per forget sequence of ``|y|`` counted targets::

    −(2/β)·log σ(−β·log π_θ(y|x)/|y| − δ)

summed over sequences and divided by the number of forget sequences in the step.  Defaults are the authors'
TOFU settings (OPTML-Group/Unlearn-Simple, TOFU/README.md): forget10 β = 4.5, δ = 0, forget-term weight 0.125;
forget05 β = 2.5, weight 0.1375 (forget01 has no published setting and takes forget05's); the RT weight stays 1.
Their code writes the margin as β·(mean NLL − γ), i.e. δ = β·γ; with the default δ = γ = 0 the two agree.
"""
from __future__ import annotations

import torch.nn.functional as F

from rklu_fast.train.methods.base import Method, StepCounts, answer_prob_sum, sequence_logprob

_TOFU_DEFAULTS = {"forget10": {"beta": 4.5, "delta": 0.0, "forget_weight": 0.125},
                  "forget05": {"beta": 2.5, "delta": 0.0, "forget_weight": 0.1375},
                  "forget01": {"beta": 2.5, "delta": 0.0, "forget_weight": 0.1375}}


class SimNPO(Method):
    name = "simnpo"
    summary = "reference-free, length-normalised NPO (authors' TOFU β, δ and forget weight by default)"
    paper = "Fan et al., Simplicity Prevails: Rethinking Negative Preference Optimization for LLM Unlearning " \
            "(arXiv 2410.07163)"
    uses = ("beta", "delta", "forget_weight")

    @classmethod
    def defaults(cls, forget_split):
        return dict(_TOFU_DEFAULTS.get(forget_split, _TOFU_DEFAULTS["forget10"]))

    def loss(self, student, batch, frozen, counts: StepCounts, want_stats=False):
        b = batch["forget"]
        logits = student(b)
        logp, n = sequence_logprob(logits, b["labels"])
        beta, delta = self.ctx.beta, self.ctx.delta
        margin = -beta * logp / n.clamp(min=1) - delta
        loss = -(2.0 / beta) * F.logsigmoid(margin).sum() / counts.sequences
        return loss, ({"forget_prob": answer_prob_sum(logits, b["labels"])} if want_stats else {})
