"""NPO: negative preference optimisation (Zhang et al., COLM 2024; arXiv 2404.05868).

Per forget sequence, with summed answer log-likelihoods under the student (``log π_θ``) and the frozen original
(``log π_ref``)::

    (2/β)·log(1 + (π_θ(y|x)/π_ref(y|x))^β) = (2/β)·softplus(β·(log π_θ − log π_ref))

summed over sequences and divided by the number of forget sequences in the step (β = 0.1).
"""
from __future__ import annotations

import torch.nn.functional as F

from rklu_fast.train.methods.base import Method, StepCounts, answer_prob_sum, sequence_logprob


class NPO(Method):
    name = "npo"
    summary = "negative preference optimisation against the frozen original (β = 0.1)"
    paper = "Zhang et al., Negative Preference Optimization, COLM 2024 (arXiv 2404.05868)"
    needs = frozenset({"reference"})
    reference_views = ("forget",)
    uses = ("beta",)

    @classmethod
    def defaults(cls, forget_split):
        return {"beta": 0.1}

    def views(self, example, epoch):
        return {"forget": dict(example, key=("gold", example["index"]))}

    def loss(self, student, batch, frozen, counts: StepCounts, want_stats=False):
        b = batch["forget"]
        logits = student(b)
        logp, _ = sequence_logprob(logits, b["labels"])
        beta = self.ctx.beta
        loss = (2.0 / beta) * F.softplus(beta * (logp - frozen.reference_logprob(b))).sum() / counts.sequences
        return loss, ({"forget_prob": answer_prob_sum(logits, b["labels"])} if want_stats else {})
