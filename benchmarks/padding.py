"""How many of the tokens a training step feeds the model are padding, before and after length grouping.

For TOFU's forget and retain sets, the loop's own data order (``ExampleStream``, 10 epochs, seed 0) is cut into
steps of ``--batch`` examples and micro-batches of ``--micro``; each micro-batch is right-padded to its longest
example. "arrival" pads the micro-batches in drawing order (the loop before length grouping); "grouped" sorts
each step's examples by length first (``loop.length_grouped``, what the loop does now: same examples per step,
same normalisers, only the padding changes).

    python benchmarks/padding.py                       # BPE of 32000 tokens trained on the TOFU text (≈ Llama-2's)
    python benchmarks/padding.py --tokenizer runs/mini-tofu/models/tokenizer
"""
from __future__ import annotations

import argparse
import tempfile
from datetime import date
from pathlib import Path

from rklu_fast.data import encode_qa, get_template, load_tofu
from rklu_fast.jsonio import write_report
from rklu_fast.train.loop import ExampleStream, length_grouped


def padded_tokens(examples: list[dict], batch: int, micro: int, epochs: int, grouped: bool, seed: int = 0
                  ) -> tuple[int, int]:
    """(tokens fed including padding, real tokens) over ``epochs`` epochs of the loop's order."""
    stream = ExampleStream(examples, batch, seed)
    fed = real = 0
    for step in range(epochs * len(examples) // batch):
        items = [e for _, e in stream.step(step)]
        if grouped:
            items = length_grouped(items)
        for i in range(0, len(items), micro):
            chunk = [len(e["input_ids"]) for e in items[i:i + micro]]
            fed += len(chunk) * max(chunk)
            real += sum(chunk)
    return fed, real


def main() -> None:
    from transformers import AutoTokenizer

    from rklu_fast.data.tokenizer import train_bpe_tokenizer

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokenizer", default=None, help="tokenizer folder (default: a 32000-token BPE trained here)")
    p.add_argument("--forget", default="forget10")
    p.add_argument("--retain", default="retain90")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--micro", default="4,8,32", help="micro-batch sizes")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--out", default="benchmarks/results")
    args = p.parse_args()
    template = get_template("llama2")
    records = {name: load_tofu(split) for name, split in (("forget", args.forget), ("retain", args.retain))}
    if args.tokenizer:
        tok = AutoTokenizer.from_pretrained(args.tokenizer)
    else:
        texts = [template.full(r["question"], r["answer"]) for rs in records.values() for r in rs]
        folder = Path(tempfile.mkdtemp())
        train_bpe_tokenizer(texts, vocab_size=32000).save_pretrained(folder)
        tok = AutoTokenizer.from_pretrained(folder)
    rows = []
    for name, recs in records.items():
        examples = [encode_qa(tok, template, r["question"], r["answer"], 500) for r in recs]
        for micro in map(int, args.micro.split(",")):
            for grouped in (False, True):
                fed, real = padded_tokens(examples, args.batch, micro, args.epochs, grouped)
                rows.append({"set": f"{name} ({args.forget if name == 'forget' else args.retain})", "micro": micro,
                             "order": "grouped" if grouped else "arrival", "fed": fed, "real": real,
                             "padding_fraction": 1 - real / fed})
    report = {"command": "python benchmarks/padding.py " + " ".join(f"--{k} {v}" for k, v in vars(args).items()
                                                                     if v is not None),
              "tokenizer": args.tokenizer or "BPE 32000 trained on the TOFU text", "batch": args.batch,
              "epochs": args.epochs, "date": date.today().isoformat(), "rows": rows}
    stem = Path(args.out) / f"padding_{date.today().isoformat()}"
    lines = [f"# Padding of training micro-batches (batch {args.batch}, {args.epochs} epochs, seed 0)", "",
             f"Command: `{report['command']}`  ", f"Tokenizer: {report['tokenizer']}", "",
             "| set | micro-batch | order | tokens fed | real tokens | padding |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['set']} | {r['micro']} | {r['order']} | {r['fed']} | {r['real']} | {r['padding_fraction']:.1%} |"
              for r in rows]
    write_report(stem, report, lines)


if __name__ == "__main__":
    main()
