"""IdkDPO: DPO with a refusal as the preferred answer and the gold answer as the dispreferred one (Rafailov et al.,
NeurIPS 2023; the TOFU baseline of Maini et al., 2024).

Per forget example, with summed answer log-likelihoods of the refusal ``y_w`` and the gold answer ``y_l`` under the
student (π_θ) and the frozen original (π_ref)::

    Δ = (log π_θ(y_w|x) − log π_θ(y_l|x)) − (log π_ref(y_w|x) − log π_ref(y_l|x))
    loss = −log σ(β·Δ)                 (TOFU's code; β = 0.1)
    loss = −(2/β)·log σ(β·Δ)           (``unlearn.dpo_form=open-unlearning``: its DPO scales by 2/β)

summed over examples and divided by the number of forget examples in the step.  Refusals are drawn as in IDK.
"""
from __future__ import annotations

import torch.nn.functional as F

from rklu_fast.train.methods.base import Method, StepCounts, answer_prob_sum, sequence_logprob
from rklu_fast.train.methods.idk import RefusalViews

DPO_FORMS = ("tofu", "open-unlearning")


class IdkDPO(Method):
    name = "dpo"
    summary = "IdkDPO: prefer a refusal over the gold answer, relative to the frozen original (β = 0.1)"
    paper = "Rafailov et al., Direct Preference Optimization, NeurIPS 2023; IdkDPO as in TOFU (Maini et al., 2024)"
    needs = frozenset({"reference"})
    reference_views = ("chosen", "rejected")
    uses = ("beta", "refusals", "dpo_form")

    def __init__(self, ctx=None):
        super().__init__(ctx)
        if self.ctx.dpo_form not in DPO_FORMS:
            raise ValueError(f"unlearn.dpo_form: must be one of {DPO_FORMS}, got {self.ctx.dpo_form!r}")
        self.refusals = RefusalViews(self.ctx)

    @classmethod
    def defaults(cls, forget_split):
        return {"beta": 0.1}

    def views(self, example, epoch):
        return {"chosen": self.refusals.view(example, epoch),
                "rejected": dict(example, key=("gold", example["index"]))}

    def loss(self, student, batch, frozen, counts: StepCounts, want_stats=False):
        chosen, rejected = batch["chosen"], batch["rejected"]
        logits_w, logits_l = student(chosen), student(rejected)
        logp_w, _ = sequence_logprob(logits_w, chosen["labels"])
        logp_l, _ = sequence_logprob(logits_l, rejected["labels"])
        delta = (logp_w - logp_l) - (frozen.reference_logprob(chosen) - frozen.reference_logprob(rejected))
        beta = self.ctx.beta
        scale = 2.0 / beta if self.ctx.dpo_form == "open-unlearning" else 1.0
        loss = -scale * F.logsigmoid(beta * delta).sum() / counts.sequences
        stats = {}
        if want_stats:
            stats = {"forget_prob": answer_prob_sum(logits_l, rejected["labels"]),
                     "refusal_prob": answer_prob_sum(logits_w, chosen["labels"]),
                     "dpo_margin": delta.detach().sum()}
        return loss, stats
