"""Unlearning inside a Hugging Face ``Trainer``: the toolkit's method plug-ins, sampling order, normalisation,
parameter groups and schedule behind ``Trainer.train()``.

``UnlearningMixin`` goes in front of any ``Trainer`` subclass (``class T(UnlearningMixin, MyTrainer)``);
``UnlearningTrainer`` is it on ``transformers.Trainer``.  What each hook does:

- ``get_train_dataloader``: the toolkit's sampling order (``hf_data``): per optimizer step the examples of
  ``rklu run`` for the same seed, whatever the Trainer's sampler, processes and accumulation split.
- ``compute_loss``: ``method.loss(student, batch, frozen, counts)`` and ``retain_term.loss(...)`` — the plug-ins of
  ``rklu_fast.train.methods``, called as the toolkit's loop (``loop.accumulate_gradients``) calls them: under
  ``accelerator.autocast()``, normalised by the whole step's ``StepCounts``, each process's loss multiplied by the
  number of processes (``sampling.loss_scale``: DDP averages gradients).  With a retain term the forget term is
  back-propagated first, without gradient synchronisation, so its graph is freed before the retain forward (the
  loop's memory profile); the Trainer back-propagates the retain term.
- ``num_items_in_batch``: the Trainer counts ``shift_labels`` (the first forget view's ``labels[:, 1:]``) over
  the step's micro-batches and, with ``average_tokens_across_devices`` (its default), over processes: the
  toolkit's counted targets of the step, ``StepCounts.tokens[view]``.  It is checked against the toolkit's count
  on the first step (a Trainer that counts otherwise stops with an error) and passed through as that view's
  normaliser.  The retain and sequence normalisers come from ``StepCounts`` (the Trainer counts one label set).
  The loss is normalised over the whole step, so the Trainer must not divide it by the accumulation steps:
  ``loss_is_scaled_for_ga = True`` (what transformers 5.24 reads) and ``model_accepts_loss_kwargs = True`` (5.17).
- ``get_decay_parameter_names`` / ``create_scheduler``: the toolkit's parameter groups (``lowmem.parameter_groups``:
  no weight decay on biases and norms) and schedule (linear warm-up over the first ``warmup_epochs`` epoch(s),
  then linear decay to 0, ``loop.plan_steps``); ``max_steps`` left at -1 becomes the toolkit's plan
  ``⌊epochs·|forget| / B⌋``.
- ``log``: adds the step-averaged ``forget_loss`` and ``retain_loss`` (each before its weight) and the method's
  statistics (``forget_prob``, ...) to the Trainer's ``loss`` (= ``forget_weight·forget + retain_weight·retain``).
"""
from __future__ import annotations

import dataclasses
import math

import torch
from accelerate.utils import DistributedType
from transformers import Trainer, get_linear_schedule_with_warmup
from transformers.trainer_utils import IntervalStrategy, SchedulerType

from rklu_fast.data.collate import to_device
from rklu_fast.data.refusals import load_refusals
from rklu_fast.integrations.hf_data import ForgetRetainDataset, MicroBatch, step_loader
from rklu_fast.integrations.hf_frozen import build_frozen
from rklu_fast.train.lowmem import parameter_groups
from rklu_fast.train.loop import plan_steps
from rklu_fast.train.methods import Method, make_method, make_retain_term, method_class
from rklu_fast.train.sampling import loss_scale


class UnlearningMixin:
    """Unlearn with a method of the toolkit's registry (RKLU by default) in any ``Trainer`` subclass.

    Keyword arguments (the rest go to the Trainer; ``train_dataset`` must be a ``ForgetRetainDataset``):

    - ``method``: a registry name (``rklu``, ``fklu``, ``ga``, ``npo``, ``simnpo``, ``idk``, ``dpo``) or a
      ``Method``; ``method_args``: ``MethodContext`` fields (``alpha``, ``beta``, ``delta``, ``backend``,
      ``refusals`` (lines or a file), ``dpo_form``, ``forget_split`` for the defaults) — unset ones take the
      method's defaults, as in ``rklu run``.
    - ``retain_term``: ``"RT"`` (default), ``"KL"``, ``None``; ``retain_weight`` (λ, 1); ``retain_kl_positions``.
    - the frozen side: ``original`` and ``augmented`` models (``teacher_mode``: ``auto`` | ``online`` | ``cached``,
      as ``teacher.mode``; ``teacher_store``: ``combined`` | ``pair``, as ``teacher.store``), or ``teacher_cache``
      (a ``TeacherCache`` or the directory a toolkit run wrote; checked against the forget set, the teacher form
      and α).  ``original`` also serves NPO/IdkDPO's reference and the KL retain term.
    - ``warmup_epochs``: the toolkit's schedule (default 1 epoch); ``None`` keeps ``TrainingArguments``' own.
    - seed: ``args.data_seed``, else ``args.seed`` (the toolkit's ``seed``: data order and refusal draws).
    """

    def __init__(self, *args, method: str | Method = "rklu", method_args: dict | None = None,
                 retain_term: str | None = "RT", retain_weight: float = 1.0, retain_kl_positions: str = "answer",
                 original: torch.nn.Module | None = None, augmented: torch.nn.Module | None = None,
                 teacher_cache=None, teacher_mode: str = "auto", teacher_store: str = "combined",
                 warmup_epochs: float | None = 1.0, **kwargs):
        super().__init__(*args, **kwargs)
        targs, data = self.args, self.train_dataset
        if not isinstance(data, ForgetRetainDataset):
            raise TypeError(f"train_dataset: expected a rklu_fast ForgetRetainDataset (forget/retain examples in "
                            f"the toolkit's templates), got {type(data).__name__}")
        if targs.n_gpu > 1:
            raise ValueError("args: one process drives several GPUs (torch.nn.DataParallel); launch one process "
                             "per GPU instead (accelerate launch or torchrun)")
        self.seed = targs.data_seed if targs.data_seed is not None else targs.seed
        if isinstance(method, Method) and method_args:
            raise ValueError("method_args: a Method instance carries its own context; pass the method's name "
                             "with method_args, or build the Method with them")
        self.method = method if isinstance(method, Method) else \
            self._make_method(method, method_args or {}, data, self.seed)
        if not self.method.trains:
            raise ValueError(f"method: {self.method.name!r} does not train (it builds a model from the original and "
                             "the augmented one: rklu run unlearn.method=...); choose a training method")
        self.retain_term = make_retain_term(retain_term or "none", self.method.ctx.backend, retain_kl_positions)
        self.forget_weight = self.method.ctx.forget_weight if self.method.ctx.forget_weight is not None else 1.0
        self.retain_weight = retain_weight
        if self.retain_term is not None and data.retain is None:
            raise ValueError(f"train_dataset: the {self.retain_term.name} retain term needs retain examples; build "
                             "the ForgetRetainDataset with retain=... or pass retain_term=None")

        # the toolkit's plan: B examples per optimizer step, ⌊epochs·|forget|/B⌋ steps, warm-up over an epoch
        self.batch_size = targs.per_device_train_batch_size * targs.gradient_accumulation_steps * targs.world_size
        total, self._warmup_steps = plan_steps(len(data), targs.num_train_epochs, self.batch_size,
                                               1.0 if warmup_epochs is None else warmup_epochs)
        if targs.max_steps <= 0:
            targs.max_steps = total
        self.warmup_epochs = warmup_epochs
        if warmup_epochs is not None and (targs.warmup_steps or targs.lr_scheduler_type != SchedulerType.LINEAR):
            raise ValueError(f"warmup_epochs: the toolkit's schedule (linear warm-up over {warmup_epochs} epoch(s), "
                             f"then linear decay) replaces lr_scheduler_type={targs.lr_scheduler_type!s} and "
                             f"warmup_steps={targs.warmup_steps}; pass warmup_epochs=None to keep the Trainer's")

        # Llama-2 has no pad token: pad with EOS as TOFU does (padding is masked)
        tokenizer = self.processing_class
        pad = getattr(tokenizer, "pad_token_id", None)
        self.pad_token_id = pad if pad is not None else getattr(tokenizer, "eos_token_id", None)
        if self.pad_token_id is None:
            raise ValueError("processing_class: pass the tokenizer (its pad or EOS token id pads the batches)")
        epochs_touched = math.ceil(targs.max_steps * self.batch_size / len(data))
        self.frozen = build_frozen(self.method, self.retain_term, self.model, forget=data.forget, original=original,
                                   augmented=augmented, teacher_cache=teacher_cache, teacher_mode=teacher_mode,
                                   teacher_store=teacher_store, template=data.template,
                                   pad_token_id=self.pad_token_id, device=targs.device,
                                   micro_batch_size=targs.per_device_train_batch_size,
                                   reference_epochs=epochs_touched, autocast=self.accelerator.autocast)

        # The loss is already normalised over the whole optimizer step (all micro-batches and processes).
        self.loss_is_scaled_for_ga = True
        self.model_accepts_loss_kwargs = True
        self._sums: dict[str, torch.Tensor] = {}
        self._steps, self._stat_steps, self._items_checked = 0, 0, False

    @staticmethod
    def _make_method(name: str, fields: dict, data: ForgetRetainDataset, seed: int) -> Method:
        fields = {"seed": seed, **fields}
        if "refusals" in method_class(name).uses:
            refusals = fields.get("refusals")
            if refusals is None or isinstance(refusals, (str, bytes)) or hasattr(refusals, "__fspath__"):
                fields["refusals"] = load_refusals(refusals, key="method_args['refusals']")
            if data.encode is None or data.questions is None:
                raise ValueError(f"train_dataset: method {name!r} encodes (question, refusal) pairs; build the "
                                 "dataset with ForgetRetainDataset.from_records or from_tofu (they keep the "
                                 "template and the questions)")
            fields.setdefault("encode", data.encode)
            fields.setdefault("questions", data.questions)
        return make_method(name, **fields)

    # ------------------------------------------------------------------ data
    def get_train_dataloader(self):
        a = self.args
        return step_loader(self.train_dataset, self.method, micro_batch_size=a.per_device_train_batch_size,
                           accumulation_steps=a.gradient_accumulation_steps, seed=self.seed,
                           pad_token_id=self.pad_token_id, rank=a.process_index, world_size=a.world_size,
                           retain=self.retain_term is not None, num_workers=a.dataloader_num_workers,
                           pin_memory=a.dataloader_pin_memory)

    # ------------------------------------------------------------------ optimizer and schedule
    def get_decay_parameter_names(self, model) -> list[str]:
        """The toolkit's decayed parameters (``lowmem.parameter_groups``: all but biases and norms)."""
        decayed = {id(p) for group in parameter_groups(model, 1.0) if group["weight_decay"] for p in group["params"]}
        return [name for name, p in model.named_parameters() if id(p) in decayed]

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        if self.warmup_epochs is None or self.lr_scheduler is not None:
            return super().create_scheduler(num_training_steps, optimizer)
        self.lr_scheduler = get_linear_schedule_with_warmup(optimizer or self.optimizer, self._warmup_steps,
                                                            num_training_steps)
        self._created_lr_scheduler = True
        return self.lr_scheduler

    # ------------------------------------------------------------------ loss
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        mb: MicroBatch | None = inputs.get("unlearning")
        if mb is None:  # evaluation on plain batches: the Trainer's own loss
            return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)
        if mb.step != self.state.global_step:
            raise RuntimeError(f"train data: a micro-batch of optimizer step {mb.step} arrived at Trainer step "
                               f"{self.state.global_step}; the data loader must be this trainer's "
                               "get_train_dataloader (the Trainer calls its set_epoch before every epoch)")
        counts = self._counts(mb, num_items_in_batch)
        device, acc = self.args.device, self.accelerator
        scale = loss_scale(acc.num_processes)
        logging_step = self.args.logging_strategy == IntervalStrategy.STEPS and \
            (self.state.global_step + 1) % max(1, int(self.state.logging_steps or 1)) == 0

        def student(batch):
            return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits

        forget = {name: to_device(b, device) for name, b in mb.forget.items()}
        with acc.autocast():
            f_loss, stats = self.method.loss(student, forget, self.frozen, counts, logging_step)
        loss = scale * self.forget_weight * f_loss
        self._add("forget_loss", f_loss)
        for key, value in stats.items():
            self._add(key, value)
        if mb.micro == 0:  # steps since the last log (the statistics only on logging steps)
            self._steps += 1
            self._stat_steps += logging_step
        if self.retain_term is None:
            return (loss, None) if return_outputs else loss
        if acc.distributed_type != DistributedType.DEEPSPEED:
            # back-propagate the forget term now (its graph is freed before the retain forward); the Trainer's
            # backward of the retain term that follows synchronises gradients on the step's last micro-batch
            with acc.no_sync(model):
                acc.backward(loss)
            loss = loss.detach()
        del f_loss, stats, forget
        retain = to_device(mb.retain, device)
        with acc.autocast():
            r_loss = self.retain_term.loss(student, retain, self.frozen, counts)
        self._add("retain_loss", r_loss)
        loss = loss + scale * self.retain_weight * r_loss
        return (loss, None) if return_outputs else loss

    def _counts(self, mb: MicroBatch, num_items_in_batch):
        """The step's normalisers; the Trainer's ``num_items_in_batch`` replaces the first forget view's count
        once it has been checked to be that count (on the first step of a ``train()``)."""
        counts = mb.counts
        if num_items_in_batch is None:
            from transformers import Trainer  # does this version read the flag set in __init__?

            if not hasattr(Trainer, "loss_is_scaled_for_ga"):
                raise RuntimeError("num_items_in_batch: this transformers version divides losses by the "
                                   "accumulation steps when it passes no num_items_in_batch; the toolkit's loss is "
                                   "already normalised over the step")
            return counts
        view = next(iter(mb.forget))
        if not self._items_checked:
            got = float(num_items_in_batch)
            if got != counts.tokens[view]:
                raise ValueError(f"num_items_in_batch: the Trainer counted {got:g} targets in this optimizer step, "
                                 f"the toolkit {counts.tokens[view]} (view {view!r}, labels[:, 1:] of every "
                                 "micro-batch of every process); under DDP keep average_tokens_across_devices=True")
            self._items_checked = True
        return dataclasses.replace(counts, tokens={**counts.tokens, view: num_items_in_batch})

    def _add(self, key: str, value: torch.Tensor) -> None:
        value = value.detach().float()
        self._sums[key] = self._sums[key] + value if key in self._sums else value

    def train(self, *args, **kwargs):
        self._items_checked = False
        self._sums, self._steps, self._stat_steps = {}, 0, 0
        return super().train(*args, **kwargs)

    # ------------------------------------------------------------------ logging
    def log(self, logs: dict, *args, **kwargs) -> None:
        """Training logs gain the step-averaged ``forget_loss``/``retain_loss`` and per-sequence statistics, summed
        over processes (every process calls ``log`` at the same steps)."""
        steps = self._steps
        if "loss" in logs and self._sums and steps > 0:
            keys = sorted(self._sums)
            values = torch.stack([self._sums[k].to(self.args.device) for k in keys])
            if self.accelerator.num_processes > 1:
                values = self.accelerator.reduce(values, "sum")
            for key, value in zip(keys, values.tolist()):
                if key in ("forget_loss", "retain_loss"):
                    logs[key] = value / steps
                elif self._stat_steps:
                    logs[key] = value / (self._stat_steps * self.batch_size)
            self._sums, self._steps, self._stat_steps = {}, 0, 0
        super().log(logs, *args, **kwargs)


class UnlearningTrainer(UnlearningMixin, Trainer):
    """``transformers.Trainer`` that unlearns with the toolkit's methods (``UnlearningMixin``)."""
