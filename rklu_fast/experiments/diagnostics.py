"""How an unlearning teacher treats the forget answers, per teacher form and α: the numbers behind the teacher
question (docs/mini-tofu.md).  Over every counted target position of the forget set:

- ``mean_logit_drift``: mean over positions of the row mean of ``l_aug − l_o`` (does continued training on the
  forget set lift the logits of the whole vocabulary?);
- ``penalised_share``: share of the vocabulary with ``l_aug − c − l_o > 0``, i.e. pushed down by the teacher;
- ``top1_agreement``: share of positions where the teacher's argmax is the original's;
- ``entropy``: mean teacher entropy (nats); ``gold_prob_original`` / ``gold_prob_teacher``: mean probability of the
  gold next token under the original and under the teacher.
"""
from __future__ import annotations

import torch

from rklu_fast.data.collate import collate, target_mask
from rklu_fast.reference import TEACHER_FORMS, augmented_shift, teacher_logits


@torch.no_grad()
def teacher_diagnostics(original, augmented, examples: list[dict], pad_token_id: int, *, alphas=(8.0,),
                        forms=TEACHER_FORMS, batch_size: int = 16) -> dict:
    original.eval()
    augmented.eval()
    sums: dict = {"drift": 0.0, "gold_o": 0.0}
    per_form = {f: {"penalised": 0.0, **{a: {"top1": 0.0, "entropy": 0.0, "gold_t": 0.0} for a in alphas}}
                for f in forms}
    rows = 0
    for start in range(0, len(examples), batch_size):
        batch = collate(examples[start:start + batch_size], pad_token_id)
        kw = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        mask = target_mask(batch["labels"])
        lo = original(**kw).logits[:, :-1][mask].float()
        la = augmented(**kw).logits[:, :-1][mask].float()
        gold = batch["labels"][:, 1:][mask]
        rows += len(lo)
        sums["drift"] += float((la - lo).mean(-1).sum())
        sums["gold_o"] += float(lo.softmax(-1).gather(-1, gold[:, None]).sum())
        top_o = lo.argmax(-1)
        for form in forms:
            c = augmented_shift(lo, la, form)
            per_form[form]["penalised"] += float(((la - c - lo) > 0).float().mean(-1).sum())
            for a in alphas:
                logq = torch.log_softmax(teacher_logits(lo, la, a, form), -1)
                s = per_form[form][a]
                s["top1"] += float((logq.argmax(-1) == top_o).sum())
                s["entropy"] += float(-(logq.exp() * logq).sum(-1).sum())
                s["gold_t"] += float(logq.exp().gather(-1, gold[:, None]).sum())
    return {"positions": rows, "mean_logit_drift": sums["drift"] / rows,
            "gold_prob_original": sums["gold_o"] / rows,
            "forms": {f: {"penalised_share": v["penalised"] / rows,
                          "alpha": {f"{a:g}": {"top1_agreement": v[a]["top1"] / rows,
                                               "entropy": v[a]["entropy"] / rows,
                                               "gold_prob_teacher": v[a]["gold_t"] / rows} for a in alphas}}
                      for f, v in per_form.items()}}
