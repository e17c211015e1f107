"""Per-example answer probabilities (TOFU's "Prob.": exp of the mean token log-likelihood of the answer)."""
from __future__ import annotations

import numpy as np
import torch

from rklu_fast.data.collate import IGNORE_INDEX
from rklu_fast.eval.nll import sequence_nll


def answer_logprob(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per example: the summed log-probability of its valid next-token labels, and their count."""
    target = labels[:, 1:]
    valid = target != IGNORE_INDEX
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    token = logp.gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (token * valid).sum(1), valid.sum(1)


def answer_probability_per_example(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    total, count = answer_logprob(logits, labels)
    return torch.exp(total / count.clamp(min=1))


@torch.no_grad()
def mean_answer_probability(model, examples: list[dict], pad_token_id: int, batch_size: int = 16) -> float:
    """Mean over ``examples`` of exp(mean answer-token log-likelihood) under ``model`` (the evaluator's NLL)."""
    model_was_training = model.training
    model.eval()
    sums, counts = sequence_nll(model, examples, pad_token_id, batch_size=batch_size)
    model.train(model_was_training)
    return float(np.exp(-sums / np.maximum(counts, 1)).mean())
