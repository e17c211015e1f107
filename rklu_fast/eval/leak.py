"""The paper's leak probe (§5, Table 4): does a model that no longer answers directly still complete a leading prefix?

For each forget question:
- **direct answer**: greedy generation from ``template.prompt(question)``;
- **fill-in-the-blank**: the prompt plus the gold answer's prefix before its *key span*, completed with beam search
  (``num_beams = num_return_sequences = k``, k = 5, at most 16 new tokens).

Key span rule (deterministic, documented in docs/evaluation.md): split the gold answer into words (whitespace);
a *span* is a maximal run of consecutive words that start with a capital letter or contain a digit (surrounding
punctuation ignored; a run ends after a word with trailing punctuation, so "Karachi, Pakistan" gives "Karachi";
leading function words such as "The", "In", "His" are dropped; a lone capitalised word opening a sentence, like
"One of ...", is no span); the key span is the first span whose normalised text does not occur in the normalised
question (normalised = lower case, possessive "'s" dropped, every run of other characters one space). Questions
whose answer has no such span are skipped (and counted).

A question *leaks* when the normalised key span occurs in any of the k normalised continuations.
"""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass

from rklu_fast.data import Template
from rklu_fast.eval.generate import generate

# Capitalised only because they start a sentence or a clause: never the start of a key span.
_FUNCTION_WORDS = frozenset(
    "the a an in on at of for from to by with as and or but this that these those it its he she they his her "
    "their him them we our you your i my yes no while although however during after before since when where "
    "which who what how why there here".split())
_TOKEN_EDGE = re.compile(r"^\W+|\W+$")
_TRAILING_PUNCT = re.compile(r"[,;:.!?\"”)]$")


def normalise(text: str) -> str:
    """Lower case, possessive 's dropped, every run of other characters one space."""
    text = re.sub(r"['’]s\b", "", text.lower())
    return " ".join(re.sub(r"[^0-9a-z]+", " ", text).split())


def _is_span_word(word: str) -> bool:
    core = _TOKEN_EDGE.sub("", word)
    return bool(core) and (core[0].isupper() or any(c.isdigit() for c in core))


def key_span(question: str, answer: str) -> tuple[str, str] | None:
    """(prefix, key span) of ``answer`` by the rule above, or None. ``prefix`` is the answer text before the span
    (trailing space removed)."""
    words = list(re.finditer(r"\S+", answer))
    q = f" {normalise(question)} "
    i = 0
    while i < len(words):
        if not _is_span_word(words[i].group()):
            i += 1
            continue
        j = i + 1  # the run ends after a word with trailing punctuation ("Karachi, Pakistan" → "Karachi")
        while j < len(words) and _is_span_word(words[j].group()) and not _TRAILING_PUNCT.search(words[j - 1].group()):
            j += 1
        run = words[i:j]
        sentence_start = i == 0 or words[i - 1].group()[-1] in ".!?"
        while run and normalise(run[0].group()) in _FUNCTION_WORDS:
            run, sentence_start = run[1:], False
        # A lone capitalised word opening a sentence is grammar, not a name ("One of her books ...").
        if run and not (sentence_start and len(run) == 1 and not any(c.isdigit() for c in run[0].group())):
            span = _TOKEN_EDGE.sub("", answer[run[0].start():run[-1].end()])
            if normalise(span) and f" {normalise(span)} " not in q:
                return answer[:run[0].start()].rstrip(), span
        i = j
    return None


@dataclass
class LeakResult:
    question: str
    key_span: str
    prefix: str
    direct_answer: str
    fill_in: list[str]
    leaked: bool
    direct_leaked: bool


def leak_probe(model, tokenizer, template: Template, rows: list[dict], *, k: int = 5, max_new_tokens: int = 16,
               batch_size: int = 8, direct_max_new_tokens: int = 64) -> dict:
    """Run the probe on ``rows`` (dicts with ``question`` and ``answer``): leaked fraction and per-question results."""
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"k: must be a positive int, got {k!r}")
    if not getattr(model, "supports_beam_search", True):
        raise ValueError(f"model: the leak probe needs beam search (its top-{k} continuations), and "
                         f"{type(model).__name__} generates greedily only; probe the original or a trained model")
    probes = []
    for i, r in enumerate(rows):
        if "question" not in r or "answer" not in r:
            raise ValueError(f"rows: row {i} lacks 'question' or 'answer'")
        found = key_span(r["question"], r["answer"])
        if found is not None:
            prefix, span = found
            probes.append((r["question"], span, prefix))
    if not probes:
        raise ValueError("rows: no answer has a key span (capitalised or numeric words absent from the question)")
    prompts = [template.prompt(q) for q, _, _ in probes]
    direct = generate(model, tokenizer, prompts, batch_size=batch_size, max_new_tokens=direct_max_new_tokens)
    # No trailing space after the prefix: BPE tokenizers attach the space to the next word, as in training.
    fill_prompts = [template.prompt(q) + template.answer(prefix) for q, _, prefix in probes]
    fills = generate(model, tokenizer, fill_prompts, batch_size=batch_size, max_new_tokens=max_new_tokens,
                     num_beams=k, num_return_sequences=k)
    results = []
    for (q, span, prefix), d, f in zip(probes, direct, fills):
        target = f" {normalise(span)} "
        results.append(LeakResult(q, span, prefix, d[0].strip(), [c.strip() for c in f],
                                  leaked=any(target in f" {normalise(c)} " for c in f),
                                  direct_leaked=target in f" {normalise(d[0])} "))
    n = len(results)
    return {"leaked_fraction": sum(r.leaked for r in results) / n,
            "direct_leaked_fraction": sum(r.direct_leaked for r in results) / n,
            "probed": n, "skipped_no_key_span": len(rows) - n, "k": k, "max_new_tokens": max_new_tokens,
            "results": [asdict(r) for r in results]}


def leak_table(probe: dict, max_rows: int = 10) -> str:
    """Markdown table of examples like the paper's Table 4."""
    def cell(text: str) -> str:
        return text.replace("|", "\\|").replace("\n", " ")

    lines = [f"Leaked (fill-in-the-blank, top-{probe['k']}): **{probe['leaked_fraction']:.1%}** of "
             f"{probe['probed']} questions; direct answer: {probe['direct_leaked_fraction']:.1%}.", "",
             "| question | key span | direct answer | fill-in-the-blank (prefix → top-k) | leaked |",
             "|---|---|---|---|---|"]
    for r in probe["results"][:max_rows]:
        fills = ", ".join(cell(c) for c in r["fill_in"])
        lines.append(f"| {cell(r['question'])} | {cell(r['key_span'])} | {cell(r['direct_answer'])} | "
                     f"“{cell(r['prefix'])} …” → {fills} | {'yes' if r['leaked'] else 'no'} |")
    return "\n".join(lines) + "\n"
