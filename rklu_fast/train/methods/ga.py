"""GA: gradient ascent on the forget answers (Jang et al., ACL 2023; TOFU's baseline, Maini et al., 2024).

``loss = −Σ NLL(forget targets) / (counted forget targets of the step)``: minimising it raises the forget NLL.
With ``retain_term=RT`` this is GradDiff (gradient difference, Liu et al., 2022; TOFU's "Grad. Diff.").
"""
from __future__ import annotations

from rklu_fast.train.methods.base import Method, StepCounts, answer_prob_sum, token_nll_sum


class GA(Method):
    name = "ga"
    summary = "gradient ascent: maximise the NLL of the forget answers (GradDiff with retain_term=RT)"
    paper = "Jang et al., Knowledge Unlearning for Mitigating Privacy Risks in Language Models, ACL 2023"

    def loss(self, student, batch, frozen, counts: StepCounts, want_stats=False):
        b = batch["forget"]
        logits = student(b)
        loss = -token_nll_sum(logits, b["labels"]) / counts.tokens["forget"]
        return loss, ({"forget_prob": answer_prob_sum(logits, b["labels"])} if want_stats else {})
