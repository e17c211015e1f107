"""IDK: fine-tune the forget questions towards a refusal ("I don't know"; Maini et al., TOFU, COLM 2024).

Each forget question is paired with a refusal drawn from the refusal file (default TOFU's ``idontknow.jsonl``) by
a generator seeded by ``(seed, epoch, example index)``, so the draw is a pure function of the data position and a
resumed run draws the same refusals (TOFU draws afresh with ``torch.randint`` at every ``__getitem__``).  The
question + refusal pair is encoded with the run's template exactly as a QA pair; the loss is its NLL, summed over
counted targets and divided by their number in the step.
"""
from __future__ import annotations

import numpy as np

from rklu_fast.train.methods.base import MethodContext
from rklu_fast.train.methods.nll import NLL


def refusal_id(ctx: MethodContext, epoch: int, index: int) -> int:
    """Which refusal example ``index`` gets in ``epoch`` (a seeded, well-mixed draw; no state)."""
    return int(np.random.default_rng([ctx.seed, epoch, index]).integers(len(ctx.refusals)))


class RefusalViews:
    """Encodes (forget question, refusal) pairs on first use; ``view(example, epoch)`` is the example's refusal
    sequence of that epoch, keyed ``("refusal", index, refusal id)`` for per-sequence caches."""

    def __init__(self, ctx: MethodContext):
        if not ctx.refusals:
            raise ValueError("unlearn.refusals: this method needs refusals (one per line)")
        if ctx.encode is None or ctx.questions is None:
            raise ValueError("MethodContext: refusal methods need `encode` and the forget `questions`")
        self.ctx, self._encoded = ctx, {}

    def view(self, example: dict, epoch: int) -> dict:
        i = example["index"]
        r = refusal_id(self.ctx, epoch, i)
        if (i, r) not in self._encoded:
            enc = self.ctx.encode(self.ctx.questions[i], self.ctx.refusals[r])
            self._encoded[i, r] = dict(enc, index=i, key=("refusal", i, r))
        return self._encoded[i, r]


class IDK(NLL):
    """NLL (fine-tuning) whose targets are the refusal views of the forget questions."""
    name = "idk"
    summary = "NLL of a refusal (\"I don't know\" variants) for each forget question"
    paper = "Maini et al., TOFU: A Task of Fictitious Unlearning for LLMs, COLM 2024"
    uses = ("refusals",)
    stat_name = "refusal_prob"

    def __init__(self, ctx=None):
        super().__init__(ctx)
        self.refusals = RefusalViews(self.ctx)

    def views(self, example, epoch):
        return {"forget": self.refusals.view(example, epoch)}
