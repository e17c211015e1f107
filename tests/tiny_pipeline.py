"""Shared helpers of the data/train/CLI/eval tests: a few real TOFU records in a temporary TOFU folder, a small BPE
tokenizer trained on them, config overrides for tiny random-init Llama / Phi models, the `needs_tofu` skip mark and
the `one_thread` fixture (autouse in the modules that import it)."""
from __future__ import annotations

import functools
import json
import tempfile
from pathlib import Path

import pytest
import torch

from rklu_fast.data import default_data_dir, load_tofu
from rklu_fast.data.templates import TEMPLATES

N_FORGET, N_RETAIN = 8, 8
needs_tofu = pytest.mark.skipif(default_data_dir("tofu") is None, reason="TOFU files not found (../shared/data/tofu)")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models on a shared CPU: one torch thread is many times faster than contending for two."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@functools.lru_cache(maxsize=None)
def tofu_dir() -> Path:
    """A TOFU folder with the first 8 records of forget01 and of retain99 (real TOFU text, a tiny slice)."""
    d = Path(tempfile.mkdtemp(prefix="rklu-tofu-"))
    src = default_data_dir("tofu")
    for split, n in (("forget01", N_FORGET), ("retain99", N_RETAIN)):
        with open(d / f"{split}.jsonl", "w") as f:
            for r in load_tofu(split, src)[:n]:
                f.write(json.dumps({"question": r["question"], "answer": r["answer"]}) + "\n")
    return d


@functools.lru_cache(maxsize=None)
def tokenizer_dir() -> Path:
    """A 320-token BPE trained on the slice above (both templates), saved in save_pretrained form."""
    from rklu_fast.data.tokenizer import train_bpe_tokenizer

    texts = [TEMPLATES[t].full(r["question"], r["answer"]) for t in ("llama2", "phi")
             for split in ("forget01", "retain99") for r in load_tofu(split, tofu_dir())]
    d = Path(tempfile.mkdtemp(prefix="rklu-tok-"))
    train_bpe_tokenizer(texts, vocab_size=320).save_pretrained(d)
    return d


def overrides(run_dir, arch: str = "llama", **extra) -> list[str]:
    """``key=value`` overrides of a tiny CPU run on the slice: ~10k-parameter model, batch 4 of micro 2."""
    template = "phi" if arch == "phi" else "llama2"
    init = ("{architecture: llama, hidden_size: 32, intermediate_size: 64, num_hidden_layers: 1, "
            "num_attention_heads: 2, num_key_value_heads: 2, max_position_embeddings: 256}" if arch == "llama" else
            "{architecture: phi, hidden_size: 32, intermediate_size: 64, num_hidden_layers: 1, "
            "num_attention_heads: 2, max_position_embeddings: 256}")
    base = {"run_dir": str(run_dir), "precision": "no", "cpu": True, "model.template": template,
            "model.tokenizer": str(tokenizer_dir()), "model.train_tokenizer": "null",
            "model.random_init": init, "model.max_length": 256,
            "data.source": str(tofu_dir()), "data.forget": "forget01", "data.retain": "retain99",
            "log.tensorboard": False, "eval.max_examples": 8}
    for stage in ("finetune", "augment", "unlearn"):
        base.update({f"{stage}.epochs": 2, f"{stage}.lr": 3e-3, f"{stage}.batch_size": 4,
                     f"{stage}.micro_batch_size": 2})
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]
