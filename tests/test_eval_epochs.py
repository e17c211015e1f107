"""Evaluation during training: the loop's epoch hook (called at every epoch boundary, invisible to training and to
exact resume), the per-epoch TOFU points and their plot, end to end through `rklu run` on a tiny model."""
import json

import pytest
import torch
from accelerate import Accelerator
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from rklu_fast.cli import main
from rklu_fast.config import ConfigError, load_config
from rklu_fast.data import encode_qa, get_template, load_tofu
from rklu_fast.eval.epochs import EpochEvaluation
from rklu_fast.train import loop
from rklu_fast.train.methods import make_method
from tiny_pipeline import needs_tofu, one_thread, overrides, tofu_dir, tokenizer_dir  # noqa: F401 (autouse)

LLAMA2 = get_template("llama2")
PNG = b"\x89PNG\r\n\x1a\n"


def tiny_llama(tok, seed=0):
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                                        num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                                        max_position_embeddings=256, bos_token_id=tok.bos_token_id,
                                        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id))


def train_tiny(tok, examples, out_dir, on_epoch=None, **kwargs):
    stage = {"epochs": 2, "lr": 3e-3, "weight_decay": 0.01, "batch_size": 4, "micro_batch_size": 2,
             "warmup_epochs": 1.0, "max_grad_norm": 1.0}
    model = kwargs.pop("model", None) or tiny_llama(tok)
    finished = loop.train(model, tok, make_method("nll"), examples, stage, out_dir, Accelerator(cpu=True),
                          tensorboard=False, on_epoch=on_epoch, **kwargs)
    return model, finished


def test_epoch_hook_sees_every_boundary_and_leaves_training_and_resume_exact(tmp_path):
    tok = AutoTokenizer.from_pretrained(tokenizer_dir())
    examples = [encode_qa(tok, LLAMA2, r["question"], r["answer"]) for r in load_tofu("forget01", tofu_dir())]
    assert len(examples) == 8  # batch 4 → 2 steps per epoch, 4 steps in all

    calls = []

    def noisy_hook(epoch, model):  # evaluates in eval mode and draws random numbers, as a real evaluation may
        calls.append((epoch, model.training))
        model.eval()
        torch.rand(7)

    plain, _ = train_tiny(tok, examples, tmp_path / "plain")
    hooked, _ = train_tiny(tok, examples, tmp_path / "hooked", on_epoch=noisy_hook)
    assert calls == [(0.0, True), (1.0, True), (2.0, True)]
    for a, b in zip(plain.state_dict().values(), hooked.state_dict().values()):
        assert torch.equal(a, b)

    # Killed after 3 steps (checkpoint at epoch 1), resumed: the hook sees the resumed epoch, then the rest.
    calls.clear()
    _, finished = train_tiny(tok, examples, tmp_path / "killed", on_epoch=noisy_hook, stop_after_steps=3)
    assert not finished and calls == [(0.0, True), (1.0, True)]
    from rklu_fast.train import checkpoint

    ckpt = checkpoint.epoch_checkpoints(tmp_path / "killed" / "checkpoints")[-1]
    calls.clear()
    resumed, finished = train_tiny(tok, examples, tmp_path / "killed", on_epoch=noisy_hook, resume_from=ckpt,
                                   model=LlamaForCausalLM.from_pretrained(ckpt))
    assert finished and calls == [(1.0, True), (2.0, True)]
    for a, b in zip(plain.state_dict().values(), resumed.state_dict().values()):
        assert torch.equal(a, b)


@needs_tofu
def test_epoch_evaluation_points_resume_and_plot_without_reference(tmp_path):
    tok = AutoTokenizer.from_pretrained(tokenizer_dir())
    model = tiny_llama(tok).eval()
    options = {"forget_split": "forget01", "ds_size": 2, "max_new_tokens": 3, "batch_size": 4}
    hook = EpochEvaluation(tmp_path, tok, LLAMA2, **options)
    hook(0.0, model)
    hook(1.0, model)
    hook(2.0, model)
    # A run resumed from epoch 1: later points are dropped and redone, the resumed epoch is not evaluated again.
    resumed = EpochEvaluation(tmp_path, tok, LLAMA2, **options)
    resumed(1.0, model)
    assert [p["epoch"] for p in resumed.points] == [0.0, 1.0]
    resumed(2.0, model)
    points = json.loads((tmp_path / "eval_epochs.json").read_text())
    assert [p["epoch"] for p in points] == [0.0, 1.0, 2.0]
    assert all(p["forget_quality"] is None and 0 <= p["model_utility"] <= 1 and len(p["parts"]) == 9
               for p in points)
    assert points[0]["train_seconds"] is None and points[2]["train_seconds"] >= 0
    assert set(points[1]["seconds_per_split"]) == {"retain", "real_authors", "world_facts", "forget", "generation"}
    assert resumed.finish().read_bytes()[:8] == PNG
    assert "| 2 |" in (tmp_path / "eval_epochs.md").read_text()


@needs_tofu
def test_rklu_run_with_per_epoch_evaluation_writes_points_and_plot(tmp_path, capsys):
    run = tmp_path / "run"
    ov = overrides(run, "llama", **{"unlearn.epochs": 2, "eval.every_epoch": "true", "eval.ds_size": 2,
                                    "eval.max_new_tokens": 3})
    assert main(["run", "--config", "configs/tiny-tofu.yaml", *ov]) == 0
    points = json.loads((run / "unlearned" / "eval_epochs.json").read_text())
    assert [p["epoch"] for p in points] == [0.0, 1.0, 2.0]  # the original, then after each epoch
    # The oracle (trained on the retain set only) is the reference: forget quality is a KS p-value.
    assert all(0 < p["forget_quality"] <= 1 for p in points)
    assert all(p["train_seconds"] > 0 for p in points[1:])
    assert (run / "unlearned" / "eval_epochs.png").read_bytes()[:8] == PNG
    assert "per-epoch evaluation" in capsys.readouterr().out


def test_per_epoch_evaluation_config_is_checked():
    with pytest.raises(ConfigError, match="eval.every_epoch"):
        load_config("configs/tiny-tofu.yaml", ["eval.every_epoch=true", "data.forget=forget20"])
    with pytest.raises(ConfigError, match="eval.ds_size"):
        load_config("configs/tiny-tofu.yaml", ["eval.ds_size=0"])
    assert load_config("configs/tiny-tofu.yaml")["eval"]["every_epoch"] is False
