"""A byte-level BPE tokenizer trained offline on TOFU text (the tiny demo needs a tokenizer and has no network).

Trained with ``tokenizers``, wrapped in ``PreTrainedTokenizerFast`` so training and evaluation use it exactly like
a hub tokenizer: ``add_special_tokens=True`` prepends BOS (as Llama's does), EOS and PAD exist.
"""
from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

PAD, BOS, EOS = "<pad>", "<s>", "</s>"


def train_bpe_tokenizer(texts, vocab_size: int = 1024) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on ``texts`` (an iterable of strings); ids 0, 1, 2 are PAD, BOS, EOS."""
    if not isinstance(vocab_size, int) or vocab_size < 256 + 3:
        raise ValueError(f"vocab_size: must be an int ≥ 259 (256 bytes + 3 special tokens), got {vocab_size!r}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[PAD, BOS, EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B",
                                                       special_tokens=[(BOS, tok.token_to_id(BOS))])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD)


def load_or_train_tokenizer(directory: str | Path, texts_fn, vocab_size: int = 1024):
    """The tokenizer cached in ``directory``; trained on ``texts_fn()`` and saved there the first time."""
    directory = Path(directory)
    if (directory / "tokenizer.json").is_file():
        return AutoTokenizer.from_pretrained(directory)
    tokenizer = train_bpe_tokenizer(texts_fn(), vocab_size)
    tokenizer.save_pretrained(directory)
    return AutoTokenizer.from_pretrained(directory)
