"""How much the frozen heads' bf16 rounding moves the unlearning teacher, measured (docs/methods.md "Precision").

The teacher ``l_t = l_o − α·relu(l_aug − l_o)`` is formed from two models' logits. With bf16 weights under bf16
autocast (what ``precision: bf16`` does), each logit is rounded to 8 significant bits before anything else: up to
half an ulp, 0.0625 for |l| ∈ [16, 32), and α multiplies the rounding of the difference. This script forms the
teacher on every answer position of a forget set three ways — fp32 weights and heads (the reference), bf16
weights with the pipeline's bf16 heads (``teacher.dtype=auto``) and bf16 weights with fp32 heads
(``teacher.dtype=float32``) — and reports KL(reference ‖ other), top-1 agreement and the largest teacher-logit
difference, per α.

    python benchmarks/teacher_precision.py --models runs/mini-tofu/models --forget forget10
"""
from __future__ import annotations

import argparse
import copy
import platform
import time
from datetime import date
from pathlib import Path

import torch

from rklu_fast.data import encode_qa, get_template, load_tofu
from rklu_fast.data.collate import collate, target_mask
from rklu_fast.jsonio import write_report
from rklu_fast.reference import teacher_logits
from rklu_fast.train.teacher import fp32_head


@torch.no_grad()
def answer_logits(model, examples, pad_id, bf16: bool, batch_size: int = 16) -> torch.Tensor:
    out = []
    for start in range(0, len(examples), batch_size):
        b = collate(examples[start:start + batch_size], pad_id)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            z = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        out.append(z[:, :-1][target_mask(b["labels"])].float())
    return torch.cat(out)


def compare(ref: torch.Tensor, other: torch.Tensor) -> dict:
    logp, logq = torch.log_softmax(ref.double(), -1), torch.log_softmax(other.double(), -1)
    kl = (logp.exp() * (logp - logq)).sum(-1)
    return {"kl_mean": float(kl.mean()), "kl_max": float(kl.max()),
            "top1_agreement": float((ref.argmax(-1) == other.argmax(-1)).double().mean()),
            "max_abs_logit_diff": float((ref - other).abs().max())}


def main() -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="runs/mini-tofu/models", help="run dir with original/, augmented/, tokenizer/")
    p.add_argument("--forget", default="forget10")
    p.add_argument("--alphas", default="2,4,8")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="benchmarks/results")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    root = Path(args.models)
    tok = AutoTokenizer.from_pretrained(root / "tokenizer")
    tok.pad_token = tok.pad_token or tok.eos_token
    template = get_template("llama2")
    examples = [encode_qa(tok, template, r["question"], r["answer"], 256) for r in load_tofu(args.forget)]
    t0 = time.perf_counter()
    logits = {}
    for role in ("original", "augmented"):
        fp32 = AutoModelForCausalLM.from_pretrained(root / role / "model", dtype=torch.float32).eval()
        bf16 = copy.deepcopy(fp32).to(torch.bfloat16)
        logits[role] = {"reference": answer_logits(fp32, examples, tok.pad_token_id, bf16=False),
                        "bf16 heads (teacher.dtype=auto)": answer_logits(bf16, examples, tok.pad_token_id, True)}
        fp32_head(bf16)
        logits[role]["fp32 heads (teacher.dtype=float32)"] = answer_logits(bf16, examples, tok.pad_token_id, True)
    rows = []
    for alpha in [float(a) for a in args.alphas.split(",")]:
        ref = teacher_logits(logits["original"]["reference"], logits["augmented"]["reference"], alpha)
        for mode in ("bf16 heads (teacher.dtype=auto)", "fp32 heads (teacher.dtype=float32)"):
            other = teacher_logits(logits["original"][mode], logits["augmented"][mode], alpha)
            rows.append({"alpha": alpha, "mode": mode, **compare(ref, other)})
    report = {"command": "python benchmarks/teacher_precision.py " + " ".join(
        f"--{k} {v}" for k, v in vars(args).items()), "date": date.today().isoformat(),
        "machine": platform.processor() or platform.machine(), "positions": len(logits["original"]["reference"]),
        "seconds": time.perf_counter() - t0, "rows": rows}
    stem = Path(args.out) / f"teacher_precision_{date.today().isoformat()}"
    lines = [f"# Teacher precision: bf16 vs fp32 LM heads ({report['positions']} answer positions of {args.forget})",
             "", f"Command: `{report['command']}`", "",
             "| α | frozen heads | KL(ref ‖ this) mean | KL max | top-1 agreement | max abs teacher-logit diff |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {r['alpha']:g} | {r['mode']} | {r['kl_mean']:.2e} | {r['kl_max']:.2e} | {r['top1_agreement']:.4f} | "
              f"{r['max_abs_logit_diff']:.3f} |" for r in rows]
    write_report(stem, report, lines)


if __name__ == "__main__":
    main()
