"""The unlearning teacher as a model: logits ``l_o − α·relu(l_aug − l_o)`` of two frozen causal LMs, usable wherever
the toolkit reads a model (``rklu eval tofu``, the run summary, the leak probe).

Saved as a small manifest, ``rklu_teacher.json`` (the two models' references and α), not as weights: the teacher is
a function of two models, and copying 2 × 14 GB for a 7B teacher would be waste.  ``load_causal_lm`` reads either a
manifest folder or an ordinary ``save_pretrained`` folder / hub id.

What differs from a transformers model, and what it costs:
- ``forward`` takes no ``logits_to_keep`` (a ``TypeError``), so the evaluator's shared-prompt pass falls back to
  scoring whole sequences (``rklu_fast.eval.nll``): the shared question is scored once per answer.
- ``generate`` is its own greedy decoder over both models' KV caches (the two caches advance together); it takes
  the arguments the evaluator passes and ignores sampling and cache options.  Greedy only.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import NamedTuple

import torch

from rklu_fast.hf_compat import cache_kwarg, output_cache
from rklu_fast.reference import teacher_logits

MANIFEST = "rklu_teacher.json"


class TeacherOutput(NamedTuple):
    logits: torch.Tensor
    caches: tuple | None  # (original's, augmented's) KV caches when use_cache


def is_teacher_dir(path: str | Path) -> bool:
    return (Path(path) / MANIFEST).is_file()


def _reference(ref: str | Path) -> str:
    """Local paths absolute (the manifest is read from anywhere), hub ids as given."""
    return str(Path(ref).resolve()) if Path(ref).exists() else str(ref)


class TeacherModel(torch.nn.Module):
    """The teacher of two frozen models (``original``, ``augmented``), as a causal LM (see the module docstring)."""
    supports_beam_search = False  # ``generate`` is greedy only: the leak probe's beam search skips this model

    def __init__(self, original: torch.nn.Module, augmented: torch.nn.Module, alpha: float,
                 references: tuple[str, str] | None = None, form: str = "logits"):
        super().__init__()
        if original.config.vocab_size != augmented.config.vocab_size:
            raise ValueError(f"augmented: vocab size {augmented.config.vocab_size}, the original's is "
                             f"{original.config.vocab_size}; the teacher is formed token by token")
        self.original, self.augmented, self.alpha, self.form = original, augmented, float(alpha), form
        self.references = references
        self.config = original.config
        self.requires_grad_(False)

    @classmethod
    def from_references(cls, original: str, augmented: str, alpha: float, *, load_model=None,
                        dtype: torch.dtype | None = None, form: str = "logits") -> "TeacherModel":
        """Both models loaded from their references (``load_model(ref)``, default ``from_pretrained``)."""
        if load_model is None:
            from transformers import AutoModelForCausalLM

            def load_model(ref):
                return AutoModelForCausalLM.from_pretrained(ref, dtype=dtype)
        return cls(load_model(original), load_model(augmented), alpha, (_reference(original), _reference(augmented)),
                   form)

    @classmethod
    def from_pretrained(cls, directory: str | Path, dtype: torch.dtype | None = None) -> "TeacherModel":
        """The teacher a manifest folder describes (``save_pretrained``'s output)."""
        path = Path(directory) / MANIFEST
        try:
            spec = json.loads(path.read_text(encoding="utf-8"))
            original, augmented, alpha = spec["original"], spec["augmented"], float(spec["alpha"])
            form = spec.get("teacher_form", "logits")
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{path}: not a teacher manifest ({{original, augmented, alpha}}): {e}") from None
        return cls.from_references(original, augmented, alpha, dtype=dtype, form=form)

    def save_pretrained(self, directory: str | Path, **_) -> None:
        if self.references is None:
            raise ValueError("TeacherModel: built from models without references; nothing to write a manifest of")
        Path(directory).mkdir(parents=True, exist_ok=True)
        spec = {"original": self.references[0], "augmented": self.references[1], "alpha": self.alpha,
                "teacher_form": self.form, "formula": "l_o - alpha * relu(l_aug - c - l_o), c by teacher_form"}
        (Path(directory) / MANIFEST).write_text(json.dumps(spec, indent=1) + "\n", encoding="utf-8")

    @property
    def device(self) -> torch.device:
        return next(self.original.parameters()).device

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, caches: tuple | None = None, use_cache: bool = False
                ) -> TeacherOutput:
        outs = []
        for model, cache in zip((self.original, self.augmented), caches or (None, None)):
            kwargs = {cache_kwarg(model): cache} if cache is not None else {}
            outs.append(model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                              use_cache=use_cache, **kwargs))
        logits = teacher_logits(outs[0].logits, outs[1].logits, self.alpha, self.form)
        return TeacherOutput(logits, tuple(output_cache(o) for o in outs) if use_cache else None)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                 max_new_tokens: int, eos_token_id: int | None = None, pad_token_id: int | None = None,
                 **_ignored) -> torch.Tensor:
        """Greedy continuation of left-padded prompts: ``[B, prompt + ≤ max_new_tokens]``; a row that produced EOS
        continues with ``pad_token_id`` (as transformers' ``generate``)."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        pad = pad_token_id if pad_token_id is not None else (eos_token_id if eos_token_id is not None else 0)
        positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        out = self(input_ids, attention_mask, positions, use_cache=True)
        sequences, mask = input_ids, attention_mask
        done = torch.zeros(len(input_ids), dtype=torch.bool, device=input_ids.device)
        for step in range(max_new_tokens):
            token = out.logits[:, -1].argmax(-1)
            token = torch.where(done, torch.full_like(token, pad), token)
            sequences = torch.cat([sequences, token[:, None]], 1)
            if eos_token_id is not None:
                done |= token == eos_token_id
            if bool(done.all()) or step == max_new_tokens - 1:
                break
            mask = torch.cat([mask, mask.new_ones(len(mask), 1)], 1)
            positions = positions[:, -1:] + 1
            out = self(token[:, None], mask, positions, caches=out.caches, use_cache=True)
        return sequences


def load_causal_lm(reference: str | Path, dtype: torch.dtype | None = None):
    """A model from a ``save_pretrained`` folder, a hub id, an adapter folder, or a teacher manifest folder."""
    if is_teacher_dir(reference):
        return TeacherModel.from_pretrained(reference, dtype=dtype)
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(reference, dtype=dtype)
