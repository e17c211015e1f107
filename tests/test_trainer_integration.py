"""RKLU inside a Hugging Face Trainer (``rklu_fast.integrations.transformers``): three optimizer steps through
``Trainer.train()`` equal three steps of the toolkit's own loop (``loop.train``) on the same data order and
optimizer settings — weights and per-step losses within 1e-5 relative, RKLU + RT, gradient accumulation 2 — with
an online or a cached teacher and with gradient checkpointing; 2 gloo processes equal 1; bad input fails at
construction, naming the argument."""
import json
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from rklu_fast.data.collate import count_targets
from tiny_pipeline import needs_tofu, one_thread, tofu_dir, tokenizer_dir  # noqa: F401 (autouse fixture)
from rklu_fast.integrations.transformers import ForgetRetainDataset, UnlearningTrainer, step_loader
from rklu_fast.train.loop import ExampleStream
from rklu_fast.train.teacher_cache import (CacheKey, StaleTeacherCache, build_forget_cache, data_fingerprint,
                                           model_logits_fn)

VOCAB, N_FORGET, N_RETAIN, SEED = 64, 8, 10, 3
# 3 optimizer steps of 4 examples (micro-batches of 2, accumulation 2): 1.5 epochs of 8 forget examples, the
# second epoch a fresh shuffle; warm-up over the first epoch (2 steps), then linear decay.
MICRO, ACCUM, EPOCHS, LR, WD, MAX_NORM = 2, 2, 1.5, 1e-3, 0.01, 1.0


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """accelerate keeps one process-wide state whose precision cannot change; the Trainer resets it when it is
    built (as ``_loop_run`` does), and so does every test here on leaving (bf16 must not leak into later tests)."""
    from accelerate.state import AcceleratorState
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def _examples(n, seed, first_label_masked=True):
    """Encoded QA-like examples: a 2-6 token question (labels -100) and a 2-6 token answer, random ids."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        q, a = (int(x) for x in torch.randint(2, 7, (2,), generator=g))
        ids = torch.randint(3, VOCAB, (q + a,), generator=g).tolist()
        labels = [-100] * q + ids[q:] if first_label_masked else list(ids)
        out.append({"input_ids": ids, "labels": labels, "attention_mask": [1] * (q + a)})
    return out


def _data(**kw):
    return ForgetRetainDataset(_examples(N_FORGET, 1, **kw), _examples(N_RETAIN, 2))


def _models():
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32)
    torch.manual_seed(0)
    student = LlamaForCausalLM(cfg)
    original = LlamaForCausalLM(cfg)
    original.load_state_dict(student.state_dict())
    augmented = LlamaForCausalLM(cfg)  # a different model: the teacher differs from the original
    return student, original, augmented


class _Tokenizer:  # what the trainer and the loop read: the pad id (and a no-op save at epoch checkpoints)
    pad_token_id, eos_token_id = 0, 2

    def save_pretrained(self, directory):
        pass


def _args(out_dir, micro=MICRO, accum=ACCUM, **kw):
    from transformers import TrainingArguments
    kw = {"save_strategy": "no", **kw}
    return TrainingArguments(str(out_dir), per_device_train_batch_size=micro, gradient_accumulation_steps=accum,
                             num_train_epochs=EPOCHS, learning_rate=LR, weight_decay=WD, max_grad_norm=MAX_NORM,
                             optim="adamw_torch", use_cpu=True, logging_steps=1, report_to=[], seed=SEED,
                             disable_tqdm=True, **kw)


def _trainer_run(out_dir, teacher="online", micro=MICRO, accum=ACCUM, **kw):
    """Weights and per-step (loss, forget_loss, retain_loss, grad_norm) of RKLU + RT through
    ``UnlearningTrainer.train()``."""
    student, original, augmented = _models()
    frozen = {"original": original, "augmented": augmented, "teacher_mode": "online"}
    if teacher == "combined":  # the trainer builds the toolkit's default cache: the teacher l_t itself
        frozen.update(teacher_mode="cached", teacher_store="combined")
    if teacher == "cached":
        key = CacheKey("original", "augmented", data_fingerprint(_data().forget), "none", "float32", VOCAB)
        cache = build_forget_cache(model_logits_fn(original, augmented), _data().forget, key, pad_token_id=0)
        frozen = {"teacher_cache": cache}
    trainer = UnlearningTrainer(model=student, args=_args(out_dir, micro, accum, **kw), train_dataset=_data(),
                                processing_class=_Tokenizer(), method="rklu", method_args={"backend": "torch"},
                                retain_term="RT", **frozen)
    trainer.train()
    logs = [(r["step"], r["loss"], r["forget_loss"], r["retain_loss"], r["grad_norm"])
            for r in trainer.state.log_history if "forget_loss" in r]
    return {k: v.detach().clone() for k, v in student.state_dict().items()}, logs


def _loop_run(out_dir, precision="no"):
    """The same 3 steps through the toolkit's own loop (``rklu_fast.train.loop.train``)."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    from rklu_fast.train import loop
    from rklu_fast.train.frozen import Frozen
    from rklu_fast.train.methods import make_method, make_retain_term
    from rklu_fast.train.teacher import OnlineTeacher

    student, original, augmented = _models()
    stage = {"epochs": EPOCHS, "lr": LR, "weight_decay": WD, "batch_size": MICRO * ACCUM, "micro_batch_size": MICRO,
             "warmup_epochs": 1.0, "max_grad_norm": MAX_NORM}
    data = _data()
    AcceleratorState._reset_state(reset_partial_state=True)  # as TrainingArguments does: a new precision
    frozen = Frozen(teacher=OnlineTeacher(original, augmented))
    loop.train(student, _Tokenizer(), make_method("rklu", alpha=8.0, backend="torch"), data.forget, stage, out_dir,
               Accelerator(cpu=True, mixed_precision=precision), frozen=frozen,
               retain_examples=data.retain, retain_term=make_retain_term("RT"), seed=SEED, tensorboard=False)
    with open(os.path.join(out_dir, "log.jsonl")) as f:
        logs = [(r["step"], r["loss"], r["forget_loss"], r["retain_loss"], r["grad_norm"]) for r in map(json.loads, f)]
    return {k: v.detach().clone() for k, v in student.state_dict().items()}, logs


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    return _loop_run(str(tmp_path_factory.mktemp("loop")))


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    return _trainer_run(tmp_path_factory.mktemp("trainer"))


def _assert_same_run(got, want, start=None):
    (w_got, logs_got), (w_want, logs_want) = got, want
    assert [r[0] for r in logs_got] == [r[0] for r in logs_want] == [1, 2, 3]
    for g, w in zip(logs_got, logs_want):
        # loss, forget_loss, retain_loss, gradient norm (before clipping: it sees any error of scale, which
        # AdamW's update would hide) of the step
        for a, b in zip(g[1:], w[1:]):
            assert abs(a - b) <= 1e-5 * abs(b), (g, w)
    for k in w_want:
        rel = (w_got[k] - w_want[k]).norm() / w_want[k].norm()
        assert rel <= 1e-5, (k, float(rel))
        torch.testing.assert_close(w_got[k], w_want[k], rtol=1e-5, atol=1e-7, msg=k)
    # it trained: steps 2 and 3 (lr 5e-4, 1e-3) moved the weights far beyond the tolerance
    w0 = _models()[0].state_dict() if start is None else start
    assert max(float((w_want[k] - w0[k]).norm() / w0[k].norm()) for k in w0) > 1e-3


def test_trainer_steps_equal_the_toolkit_loop(one_process, reference):
    _assert_same_run(one_process, reference)


@pytest.mark.parametrize("variant", ["cached-teacher", "combined-cache", "gradient-checkpointing"])
def test_trainer_variants_equal_the_toolkit_loop(variant, reference, tmp_path):
    if variant == "cached-teacher":  # a teacher cache built by the toolkit instead of the two frozen models
        got = _trainer_run(tmp_path, teacher="cached")
    elif variant == "combined-cache":
        got = _trainer_run(tmp_path, teacher="combined")
    else:
        got = _trainer_run(tmp_path, gradient_checkpointing=True)
    _assert_same_run(got, reference)


def test_bf16_autocast_equals_the_toolkit_loop_in_bf16(tmp_path):
    """``bf16=True``: the student's forward, the frozen models and the loss run under the same accelerate autocast
    as the loop's ``precision=bf16`` (CPU autocast here); the runs agree as closely as the fp32 ones, while bf16
    moves the losses by ≫ 1e-5 from fp32 (so autocast is on in both)."""
    fp32 = _loop_run(str(tmp_path / "fp32"))
    want = _loop_run(str(tmp_path / "loop"), precision="bf16")
    _assert_same_run(_trainer_run(tmp_path / "trainer", bf16=True), want)
    assert max(abs(a[1] - b[1]) / b[1] for a, b in zip(want[1], fp32[1])) > 1e-5


# method → retain term: the frozen sides other than RKLU's (reference log-likelihoods with two refusal/gold views
# and a sequence normaliser; the original for the KL term beside the teacher; a method's default forget weight)
OTHER_METHODS = {"dpo": "RT", "fklu": "KL", "simnpo": "RT"}


@needs_tofu
@pytest.mark.parametrize("name", list(OTHER_METHODS))
def test_other_methods_through_the_trainer_equal_the_loop(name, tmp_path):
    """Real TOFU records in the phi template (``ForgetRetainDataset.from_tofu``), a 320-token BPE: 3 steps of
    IdkDPO + RT, FKLU + KL, SimNPO + RT through the trainer equal 3 steps of ``loop.train`` with the same method
    plug-in (weights and per-step losses within 1e-5 relative)."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from rklu_fast.data.refusals import load_refusals
    from rklu_fast.integrations.transformers import build_frozen
    from rklu_fast.train import loop
    from rklu_fast.train.methods import make_method, make_retain_term

    tok = AutoTokenizer.from_pretrained(tokenizer_dir())
    refusals = load_refusals(None)

    def run(trainer: bool):
        cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                          num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=256)
        torch.manual_seed(0)
        student, augmented = LlamaForCausalLM(cfg), LlamaForCausalLM(cfg)
        original = LlamaForCausalLM(cfg)
        original.load_state_dict(student.state_dict())
        start = {k: v.clone() for k, v in student.state_dict().items()}
        data = ForgetRetainDataset.from_tofu(tok, "phi", forget="forget01", retain="retain99", source=tofu_dir(),
                                             max_length=128)
        needs_teacher = name == "fklu"
        frozen = {"original": original, **({"augmented": augmented, "teacher_mode": "online"} if needs_teacher else {})}
        if trainer:
            t = UnlearningTrainer(model=student, args=_args(tmp_path / "trainer"), train_dataset=data,
                                  processing_class=tok, method=name, retain_term=OTHER_METHODS[name],
                                  method_args={"backend": "torch", "refusals": refusals}, **frozen)
            t.train()
            logs = [(r["step"], r["loss"], r["forget_loss"], r["retain_loss"], r["grad_norm"])
                    for r in t.state.log_history if "forget_loss" in r]
            return dict(student.state_dict()), logs, start
        method = make_method(name, seed=SEED, backend="torch", refusals=refusals, encode=data.encode,
                             questions=data.questions)
        retain_term = make_retain_term(OTHER_METHODS[name], "torch")
        frozen = build_frozen(method, retain_term, student, forget=data.forget, pad_token_id=tok.pad_token_id,
                              device="cpu", micro_batch_size=MICRO, reference_epochs=2, **frozen)
        stage = {"epochs": EPOCHS, "lr": LR, "weight_decay": WD, "batch_size": MICRO * ACCUM,
                 "micro_batch_size": MICRO, "warmup_epochs": 1.0, "max_grad_norm": MAX_NORM}
        out = tmp_path / "loop"
        AcceleratorState._reset_state(reset_partial_state=True)
        loop.train(student, tok, method, data.forget, stage, out, Accelerator(cpu=True, mixed_precision="no"),
                   frozen=frozen, retain_examples=data.retain, retain_term=retain_term,
                   forget_weight=method.ctx.forget_weight, seed=SEED, tensorboard=False)
        with open(out / "log.jsonl") as f:
            logs = [(r["step"], r["loss"], r["forget_loss"], r["retain_loss"], r["grad_norm"])
                    for r in map(json.loads, f)]
        return dict(student.state_dict()), logs, start

    *want, w0 = run(trainer=False)
    *got, _ = run(trainer=True)
    _assert_same_run(got, want, start=w0)


def test_resuming_a_trainer_checkpoint_mid_epoch_continues_exactly(one_process, tmp_path):
    """A Trainer checkpoint after step 1 (inside Trainer epoch 0 of 2 steps) resumed by a fresh trainer: it trains
    only steps 1 and 2 (the Trainer skips the consumed micro-batches of the step loader) and ends on the
    uninterrupted run's weights."""
    student, original, augmented = _models()
    trainer = UnlearningTrainer(model=student, args=_args(tmp_path / "first", save_strategy="steps", save_steps=1),
                                train_dataset=_data(), processing_class=_Tokenizer(), original=original,
                                augmented=augmented, teacher_mode="online", method_args={"backend": "torch"})
    trainer.train()
    student, original, augmented = _models()
    resumed = UnlearningTrainer(model=student, args=_args(tmp_path / "resumed"), train_dataset=_data(),
                                processing_class=_Tokenizer(), original=original, augmented=augmented,
                                teacher_mode="online", method_args={"backend": "torch"})
    steps, compute_loss = [], resumed.compute_loss

    def recording(model, inputs, **kw):
        steps.append(inputs["unlearning"].step)
        return compute_loss(model, inputs, **kw)

    resumed.compute_loss = recording
    resumed.train(resume_from_checkpoint=str(tmp_path / "first" / "checkpoint-1"))
    assert steps == [1, 1, 2, 2]
    for k, w in one_process[0].items():
        torch.testing.assert_close(student.state_dict()[k], w, rtol=1e-5, atol=1e-7, msg=k)


def test_parameter_groups_and_schedule_are_the_toolkits(tmp_path):
    """No weight decay on norms (this model has no biases); lr: 0, then LR/2 (warm-up over the first epoch = 2
    steps), then LR, decaying linearly to 0 at step 3 — read back from the optimizer the Trainer built."""
    student, original, augmented = _models()
    trainer = UnlearningTrainer(model=student, args=_args(tmp_path), train_dataset=_data(),
                                processing_class=_Tokenizer(), original=original, augmented=augmented,
                                method_args={"backend": "torch"}, teacher_mode="online")
    trainer.create_optimizer_and_scheduler(num_training_steps=trainer.args.max_steps)
    assert trainer.args.max_steps == 3  # ⌊1.5 · 8 / 4⌋
    by_decay = {g["weight_decay"]: {id(p) for p in g["params"]} for g in trainer.optimizer.param_groups if g["params"]}
    names = {id(p): n for n, p in student.named_parameters()}
    assert sorted(names[i] for i in by_decay[0.0]) == sorted(n for n in names.values() if "norm" in n)
    assert all("norm" not in names[i] for i in by_decay[WD])
    lrs = []
    for _ in range(3):
        lrs.append(trainer.lr_scheduler.get_last_lr()[0])
        trainer.optimizer.step()
        trainer.lr_scheduler.step()
    assert lrs == pytest.approx([0.0, LR / 2, LR])
    assert trainer.lr_scheduler.get_last_lr()[0] == 0.0


def test_data_order_is_the_toolkits_on_every_process():
    """Process r's micro-batches of a step are the r-th half of the step's examples of ExampleStream (forget: seed,
    retain: seed + 1), grouped by length as the loop's micro-batches are (``loop.length_grouped``), forget chunk i
    paired with retain chunk i; every micro-batch carries the whole step's counts; Trainer epoch 1 starts at step
    ⌈8 / 4⌉ = 2."""
    from rklu_fast.train.loop import length_grouped
    from rklu_fast.train.methods import make_method

    data, method = _data(), make_method("rklu")
    loaders = [step_loader(data, method, micro_batch_size=1, accumulation_steps=2, seed=SEED, pad_token_id=0,
                           rank=r, world_size=2) for r in (0, 1)]
    forget, retain = ExampleStream(data.forget, 4, SEED), ExampleStream(data.retain, 4, SEED + 1)
    for epoch in (0, 1):
        batches = []
        for loader in loaders:
            loader.set_epoch(epoch)
            batches.append(list(loader))
        assert [len(b) for b in batches] == [2 * 2, 2 * 2]  # 2 steps per Trainer epoch x 2 micro-batches
        for i in range(2):
            step = 2 * epoch + i
            f_want = [e for _, e in forget.step(step)]
            r_want = [e for _, e in retain.step(step)]
            for rank in (0, 1):
                mbs = [b["unlearning"] for b in batches[rank][2 * i:2 * i + 2]]
                assert [mb.step for mb in mbs] == [step] * 2
                half = slice(2 * rank, 2 * rank + 2)
                got_f = [int(mb.forget["forget"]["index"][0]) for mb in mbs]
                got_r = [int(mb.retain["index"][0]) for mb in mbs]
                assert sorted(got_f) == sorted(e["index"] for e in f_want[half])
                assert got_f == [e["index"] for e in length_grouped(f_want[half])]
                assert got_r == [e["index"] for e in length_grouped(r_want[half])]
                for mb in mbs:
                    assert mb.counts.tokens == {"forget": count_targets(f_want)}
                    assert mb.counts.retain_tokens == count_targets(r_want)
    first = next(iter(loaders[0]))
    assert torch.equal(first["shift_labels"], first["labels"][:, 1:])


def _worker(rank, world, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    weights, logs = _trainer_run(out_dir, micro=MICRO, accum=ACCUM // world, ddp_backend="gloo")
    if rank == 0:
        torch.save({"weights": weights, "logs": logs}, os.path.join(out_dir, "result.pt"))
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_gloo_processes_equal_one(one_process, tmp_path, monkeypatch):
    """The same 4-example steps as 2 processes x 1 micro-batch of 2 (DDP over gloo, the Trainer's own
    accelerate set-up) as 1 process x 2 accumulated micro-batches."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    two = torch.load(os.path.join(tmp_path, "result.pt"))
    _assert_same_run((two["weights"], two["logs"]), one_process)


# ---------------------------------------------------------------------------------------------- bad input
def _construct(tmp_path, **kw):
    student = _models()[0]
    kw.setdefault("train_dataset", _data())
    return UnlearningTrainer(model=student, args=_args(tmp_path), processing_class=_Tokenizer(),
                             method_args={"backend": "torch"}, **kw)


def test_rklu_without_a_teacher_fails_naming_the_arguments(tmp_path):
    with pytest.raises(ValueError, match=r"^original and augmented: method 'rklu' distils from the unlearning"):
        _construct(tmp_path)
    _, original, _ = _models()
    with pytest.raises(ValueError, match=r"^augmented: method 'rklu'.*teacher_cache="):
        _construct(tmp_path, original=original)


def test_teacher_cache_of_another_dataset_fails_naming_the_argument(tmp_path):
    _, original, augmented = _models()
    other = _examples(N_FORGET, 99)  # another forget set of the same size
    key = CacheKey("o", "a", data_fingerprint(other), "none", "float32", VOCAB)
    cache = build_forget_cache(model_logits_fn(original, augmented), other, key, pad_token_id=0,
                               path=tmp_path / "cache")
    for given in (cache, str(tmp_path / "cache")):  # the object, or the directory a toolkit run wrote
        with pytest.raises(StaleTeacherCache, match=r"^teacher_cache: built for another forget set"):
            _construct(tmp_path, teacher_cache=given)
    with pytest.raises(FileNotFoundError, match=r"^teacher_cache: no teacher cache in"):
        _construct(tmp_path, teacher_cache=str(tmp_path / "missing"))
    # the right forget set, but the teacher formed with another α (a combined cache bakes α in)
    forget = _data().forget
    key = CacheKey("o", "a", data_fingerprint(forget), "none", "float32", VOCAB, store="combined", alpha=4.0)
    cache = build_forget_cache(model_logits_fn(original, augmented), forget, key, pad_token_id=0)
    with pytest.raises(StaleTeacherCache, match=r"^teacher_cache: holds the teacher formed with α = 4.0, the "
                                                r"method uses α = 8.0"):
        _construct(tmp_path, teacher_cache=cache)


def test_other_bad_input_fails_at_construction(tmp_path):
    _, original, augmented = _models()
    teacher = {"original": original, "augmented": augmented, "teacher_mode": "online"}
    with pytest.raises(ValueError, match=r"^train_dataset: the RT retain term needs retain examples"):
        _construct(tmp_path, train_dataset=ForgetRetainDataset(_examples(N_FORGET, 1)), **teacher)
    with pytest.raises(TypeError, match=r"^train_dataset: expected a rklu_fast ForgetRetainDataset"):
        _construct(tmp_path, train_dataset=_examples(N_FORGET, 1), **teacher)
    with pytest.raises(ValueError, match=r"^teacher_mode: must be one of"):
        _construct(tmp_path, **{**teacher, "teacher_mode": "fast"})
    from rklu_fast.train.methods import make_method
    with pytest.raises(ValueError, match=r"^method_args: a Method instance carries its own context"):
        UnlearningTrainer(model=_models()[0], args=_args(tmp_path), train_dataset=_data(),
                          processing_class=_Tokenizer(), method=make_method("rklu"), method_args={"alpha": 4.0},
                          **teacher)
    with pytest.raises(ValueError, match=r"^warmup_epochs: the toolkit's schedule"):
        UnlearningTrainer(model=_models()[0], args=_args(tmp_path, warmup_steps=5), train_dataset=_data(),
                          processing_class=_Tokenizer(), **teacher)


def test_a_trainer_counting_other_targets_stops_with_an_error(tmp_path):
    """transformers before 4.5x counted ``num_items_in_batch`` on unshifted labels; with a first label that counts,
    that is one target per sequence too many — the trainer refuses it instead of training on it."""
    class UnshiftedCount(UnlearningTrainer):
        def _get_num_items_in_batch(self, batch_samples, device):
            return sum(b["labels"].ne(-100).sum() for b in batch_samples)

    student, original, augmented = _models()
    trainer = UnshiftedCount(model=student, args=_args(tmp_path),
                             train_dataset=_data(first_label_masked=False), processing_class=_Tokenizer(),
                             original=original, augmented=augmented, teacher_mode="online",
                             method_args={"backend": "torch"})
    with pytest.raises(ValueError, match=r"^num_items_in_batch: the Trainer counted \d+ targets in this optimizer "
                                         r"step, the toolkit \d+"):
        trainer.train()
