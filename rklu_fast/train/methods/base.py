"""What a method is: a loss plug-in of the one training loop (``rklu_fast.train.loop``).

A method turns one forget micro-batch into its share of the step's loss.  It never runs the loop: the loop draws
the step's examples, asks the method for the sequences each example trains on (``views``), pads them, and calls
``loss`` under autocast; the method runs the student through the ``student`` callable and reads whatever frozen
quantity it declared in ``needs`` from the ``frozen`` object (``rklu_fast.train.frozen.Frozen``), which hides
where those come from (live models or caches).

Normalisation under gradient accumulation (``StepCounts``): a token-level term is a sum over the step's counted
targets divided by their number over the WHOLE step (every micro-batch, every process); a sequence-level term
(NPO, SimNPO, DPO) is a sum over sequences divided by the number of forget sequences in the step.  Accumulating
micro-batches therefore gives exactly the gradient of one big batch.  Causal shift: ``logits[:, :-1]`` score
``labels[:, 1:]`` (``rklu_fast.data.collate.target_mask``); the loss ops never shift.

Statistics for the log are computed only when the loop asks (``want_stats``: every ``log.every`` steps) and
returned as tensors summed over the micro-batch's forget sequences; the loop divides by the step's sequence count
and reads them with the step's one host sync.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, ClassVar

import torch
import torch.nn.functional as F

from rklu_fast.data.collate import IGNORE_INDEX, target_mask


@dataclass(frozen=True)
class StepCounts:
    """Normalisers of one optimizer step, over all its micro-batches and processes."""
    tokens: dict[str, int]          # counted targets of each forget view
    sequences: int                  # forget examples in the step
    retain_tokens: int = 0          # counted targets of the retain examples
    retain_positions: int = 0       # Σ B·T over the padded retain micro-batches (KL retain term over all positions)


@dataclass
class MethodContext:
    """Everything a method may be configured with (resolved from ``unlearn.*`` by the pipeline).

    ``beta``/``delta``/``forget_weight`` are already resolved to the method's defaults when not configured.
    ``encode(question, answer)`` tokenises a QA pair with the run's template (``encode_qa``); ``questions`` are
    the forget questions by example index; ``refusals`` the lines of the refusal file.
    """
    alpha: float = 8.0
    beta: float | None = None
    delta: float | None = None
    forget_weight: float | None = None   # weight of the forget term (None: the method's default, else 1)
    backend: str = "auto"
    seed: int = 0
    refusals: list[str] | None = None
    encode: Callable[[str, str], dict] | None = None
    questions: list[str] | None = None
    dpo_form: str = "tofu"
    teacher_form: str = "logits"          # the teacher's form (rklu_fast.reference.TEACHER_FORMS)
    extra: dict = field(default_factory=dict)


class Method:
    """Base of every method; subclasses set the class attributes and override ``loss`` (and ``views``)."""
    name: ClassVar[str]
    summary: ClassVar[str]                    # one line for ``rklu methods``
    paper: ClassVar[str]                      # where it comes from
    # What the unlearn stage must build for it:
    #   "teacher":   the unlearning teacher's inputs (original + augmented logits, online or cached)
    #   "reference": the frozen original's summed log-likelihood of each sequence of ``reference_views``
    #   "augmented": the augmented model itself (methods that do not train: ta, teacher)
    needs: ClassVar[frozenset[str]] = frozenset()
    trains: ClassVar[bool] = True
    reference_views: ClassVar[tuple[str, ...]] = ()
    uses: ClassVar[tuple[str, ...]] = ()     # ``unlearn.*`` hyper-parameters it reads (beta, delta, ...)
    fused_linear: ClassVar[bool] = False     # its forget term can take the student's hidden states and head

    def __init__(self, ctx: MethodContext | None = None):
        self.ctx = ctx or MethodContext()

    @classmethod
    def defaults(cls, forget_split: str | None) -> dict:
        """Default hyper-parameters (``beta``, ``delta``, ``forget_weight``) for a forget split."""
        return {}

    def views(self, example: dict, epoch: int) -> dict[str, dict]:
        """The encoded sequences one forget example trains on in ``epoch``, by view name (default: itself)."""
        return {"forget": example}

    def loss(self, student: Callable[[dict], torch.Tensor], batch: dict[str, dict], frozen, counts: StepCounts,
             want_stats: bool = False) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        raise NotImplementedError


# ------------------------------------------------------------------ small formulas shared by several methods
def token_nll_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed next-token cross-entropy (nats, float32) over the counted targets of a batch."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(),
                           ignore_index=IGNORE_INDEX, reduction="sum")


def sequence_logprob(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sequence: summed log-likelihood of its counted targets (float32 ``[B]``) and their number ``[B]``."""
    targets = labels[:, 1:]
    mask = target_mask(labels)
    logp = -F.cross_entropy(logits[:, :-1].transpose(1, 2).float(), targets.clamp(min=0), reduction="none")
    return (logp * mask).sum(1), mask.sum(1)


def answer_prob_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Σ over sequences of exp(mean token log-likelihood): TOFU's answer probability, summed (for the log)."""
    with torch.no_grad():
        total, count = sequence_logprob(logits.detach(), labels)
        return torch.exp(total / count.clamp(min=1)).sum()
