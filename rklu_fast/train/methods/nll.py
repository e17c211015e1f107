"""NLL: plain fine-tuning on the given examples (the ``finetune`` and ``augment`` stages, not an unlearning method).

``loss = Σ NLL(counted targets) / (counted targets of the step)``, TOFU's fine-tuning objective.
"""
from __future__ import annotations

from rklu_fast.train.methods.base import Method, StepCounts, answer_prob_sum, token_nll_sum


class NLL(Method):
    name = "nll"
    summary = "fine-tuning: NLL of the answers (the finetune and augment stages)"
    paper = "Maini et al., TOFU, COLM 2024 (fine-tuning recipe)"
    stat_name = "forget_prob"  # the mean probability of the target sequences, logged

    def loss(self, student, batch, frozen, counts: StepCounts, want_stats=False):
        b = batch["forget"]
        logits = student(b)
        loss = token_nll_sum(logits, b["labels"]) / counts.tokens["forget"]
        return loss, ({self.stat_name: answer_prob_sum(logits, b["labels"])} if want_stats else {})
