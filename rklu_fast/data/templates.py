"""Prompt templates exactly as TOFU renders them (``data_module.py`` + ``config/model_config.yaml``).

One module for training and evaluation, so a model is always read through the template it was trained with.

TOFU builds ``question_start + question + question_end`` as the prompt and ``answer_tag + answer`` as the
answer, concatenated with no extra space; the number of question tokens is ``len(tokenizer.tokenize(prompt,
add_special_tokens=True))`` (BOS included), and those label positions are masked.  When the text is shorter
than ``max_length`` one EOS is appended and kept in the loss; padding is masked.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Template:
    name: str
    question_start: str
    question_end: str
    answer_tag: str

    def prompt(self, question: str) -> str:
        """The text the model sees before it answers (also the generation prompt in evaluation)."""
        return self.question_start + question + self.question_end

    def answer(self, answer: str) -> str:
        """The supervised continuation; the answer tag (Phi's ``Answer: ``) is inside the loss."""
        return self.answer_tag + answer

    def full(self, question: str, answer: str) -> str:
        return self.prompt(question) + self.answer(answer)


TEMPLATES: dict[str, Template] = {
    "llama2": Template("llama2", "[INST] ", " [/INST]", ""),
    "phi": Template("phi", "Question: ", "\n", "Answer: "),
    # Plain text (Harry Potter-style chunks, tiny demo models): no question part.
    "plain": Template("plain", "", "", ""),
}
_ALIASES = {"llama2-7b": "llama2", "llama-2": "llama2", "llama": "llama2", "phi-1.5": "phi", "phi-1_5": "phi"}


def get_template(name: str) -> Template:
    key = _ALIASES.get(name, name)
    if key not in TEMPLATES:
        raise ValueError(f"template: unknown template {name!r}; choose one of {sorted(TEMPLATES)}")
    return TEMPLATES[key]


def encode_qa(tokenizer, template: Template, question: str, answer: str, max_length: int = 500) -> dict:
    """Token ids, labels (question masked with -100) and attention mask of one QA pair, unpadded.

    Mirrors TOFU's ``convert_raw_data_to_model_format``: the full text is tokenised with special tokens and
    truncated to ``max_length``; if it is shorter, EOS is appended and is part of the loss.
    """
    if tokenizer.eos_token_id is None:
        raise ValueError("tokenizer: has no eos_token_id; TOFU's format appends EOS to every answer")
    full = template.full(question, answer)
    ids = list(tokenizer(full, add_special_tokens=True, max_length=max_length, truncation=True)["input_ids"])
    n_question = len(tokenizer.tokenize(template.prompt(question), add_special_tokens=True))
    if len(ids) < max_length:
        ids.append(tokenizer.eos_token_id)
    labels = [-100 if i < n_question else t for i, t in enumerate(ids)]
    return {"input_ids": ids, "labels": labels, "attention_mask": [1] * len(ids), "num_question_tokens": n_question}
