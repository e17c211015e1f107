"""Per-example summed negative log-likelihood of the labelled tokens, batched (TOFU's ``get_batch_loss``)."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from rklu_fast.data.collate import IGNORE_INDEX, collate


@torch.inference_mode()
def sequence_nll(model, examples: list[dict], pad_token_id: int, *, batch_size: int = 16
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Summed NLL (nats, float32 logits) and number of scored tokens of each example (``encode_qa`` /
    ``chunk_text`` dicts: ``input_ids``, ``labels`` with -100 where unscored).

    Examples are batched in order of length (less padding); right padding leaves each example's values unchanged.
    Only the scored positions' logits go through the softmax (a QA pair's question is a quarter of its tokens).
    """
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size: must be a positive int, got {batch_size!r}")
    device = next(model.parameters()).device
    sums = np.zeros(len(examples))
    counts = np.zeros(len(examples), dtype=np.int64)
    order = sorted(range(len(examples)), key=lambda i: len(examples[i]["input_ids"]))
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        batch = {k: v.to(device) for k, v in collate([examples[i] for i in idx], pad_token_id).items()}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        labels = batch["labels"][:, 1:]
        scored = labels != IGNORE_INDEX
        row = scored.nonzero()[:, 0]
        nll = F.cross_entropy(logits[:, :-1][scored].float(), labels[scored], reduction="none")
        sums[idx] = torch.zeros(len(idx), dtype=torch.float64, device=device).index_add_(
            0, row, nll.double()).cpu().numpy()
        counts[idx] = scored.sum(-1).cpu().numpy()
    return sums, counts
