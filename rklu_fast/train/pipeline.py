"""The stages of a run — finetune → augment → unlearn — and what they read and write under ``run_dir``.

    <run_dir>/config.yaml, versions.json     the resolved config and package versions
    <run_dir>/tokenizer/                     the BPE trained offline (model.train_tokenizer)
    <run_dir>/<role>/model/                  final model of a role: original, oracle, augmented, unlearned
                                             (LoRA: augmented and unlearned hold an adapter on the original)
    <run_dir>/<role>/merged/                 LoRA with lora.merge: the adapter merged into a plain model
    <run_dir>/<role>/checkpoints/epoch-K/    epoch checkpoints (model + optimizer/scheduler/RNG/step)
    <run_dir>/<role>/log.jsonl, tensorboard/ per-step metrics
    <run_dir>/unlearned/eval_epochs.json|png|md  TOFU metrics per epoch (eval.every_epoch; docs/evaluation.md)
    <run_dir>/summary.json                   answer probabilities before/after unlearning

A role whose ``model/`` exists is done and skipped, so ``rklu run`` picks up where it stopped; a role with
checkpoints but no model was interrupted and continues from its last checkpoint with ``--resume``.
"""
from __future__ import annotations

import json
import os
import platform
from importlib import metadata
from pathlib import Path

import torch
import yaml

from rklu_fast.config import DEFAULTS, ConfigError
from rklu_fast.data.chunks import chunk_text
from rklu_fast.data.templates import encode_qa, get_template
from rklu_fast.data.tofu import load_tofu
from rklu_fast.model_refs import from_pretrained, missing_local
from rklu_fast.data.refusals import load_refusals
from rklu_fast.teacher_model import is_teacher_dir, load_causal_lm
from rklu_fast.train import checkpoint, distributed, lora, loop
from rklu_fast.train.frozen import Frozen, ReferenceLogProbs
from rklu_fast.train.methods import MethodContext, make_method, make_retain_term, method_class
from rklu_fast.train.metrics import mean_answer_probability
from rklu_fast.train.student import fused_linear_choice
from rklu_fast.train.teacher import check_same_vocab, fp32_head
from rklu_fast.train.teacher_cache import make_teacher
from rklu_fast.jsonio import write_json

ROLES = ("original", "oracle", "augmented", "unlearned")
# Keys that say how a run executes or reports, not what it computes: a run dir may continue with other values.
RUNTIME_KEYS = ("run_dir", "threads", "log", "checkpoint", "experiment", "distributed")
# How the NLL stages split a step into micro-batches changes their padding, not their gradient (the step's
# normalisers do not depend on it): a run dir may continue with another split.
LAYOUT_KEYS = ("finetune.micro_batch_size", "augment.micro_batch_size")
# The roles a config section affects (others affect every role): a section may change while none of its roles
# has written anything yet (e.g. a run dir of shared models, unlearned later with several settings).
STAGE_ROLES = {"finetune": ("original", "oracle"), "augment": ("augmented",),
               "unlearn": ("unlearned",), "teacher": ("unlearned",), "eval": ("unlearned",)}
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class Run:
    """One run directory and its config; ``resume`` continues interrupted stages from their last checkpoint;
    ``stop_after_steps`` stops the first stage that trains after that many steps (a simulated kill)."""

    def __init__(self, config: dict, resume: bool = False, stop_after_steps: int | None = None):
        self.cfg, self.resume, self.stop_after_steps = config, resume, stop_after_steps
        self.dir = Path(config["run_dir"])
        self.template = get_template(config["model"]["template"])
        self._accelerator = None
        self.stopped = False
        self.stages: tuple[str, ...] = ()
        self.refusals: list[str] | None = None
        self._resume_points: dict = {}  # role → verified checkpoint to resume from (checkpoint.resume_point)

    # ------------------------------------------------------------------ checks before any compute
    def preflight(self, stages: tuple[str, ...]) -> None:
        """Config against the run dir, data, model references, vocabularies: errors before any training."""
        self._check_engine(stages)
        if self.cfg["distributed"]["engine"] == "fsdp2" or _accelerate_sharding() is not None:
            _ = self.accelerator  # the engine's checks (launch config, number of processes)
        self._check_lora(stages)
        saved = self.dir / "config.yaml"
        if saved.is_file():
            # keys the toolkit gained since the run started count as their defaults, not as changes
            old = _with_defaults(yaml.safe_load(saved.read_text()), DEFAULTS)
            changed = sorted(k for k in _diff(old, self.cfg) if k.split(".")[0] not in RUNTIME_KEYS
                             and k not in LAYOUT_KEYS and self._has_outputs(STAGE_ROLES.get(k.split(".")[0], ROLES)))
            if changed:
                raise ConfigError(f"run_dir: {self.dir} was started with a different config (changed: "
                                  f"{', '.join(changed)}); use a new run_dir or the same config")
        self.forget_records, self.retain_records = self._records()
        for role in self._roles(stages):
            ckpts = checkpoint.epoch_checkpoints(self.dir / role / "checkpoints")
            if ckpts and not (self.dir / role / "model").is_dir() and not self.resume:
                raise ConfigError(f"run_dir: the {role!r} stage in {self.dir} was interrupted at {ckpts[-1].name}; "
                                  "continue it with --resume (or use a new run_dir)")
            if self.resume and not (self.dir / role / "model").is_dir():
                # verified before any compute: damage is reported or refused now
                if (ckpt := self._resume_point(role)) is not None:
                    self._check_checkpoint_engine(role, ckpt)
        c = self.cfg
        given = {"finetune.original": c["finetune"]["original"], "finetune.oracle": c["finetune"]["oracle"],
                 "augment.model": c["augment"]["model"], "model.name_or_path": c["model"]["name_or_path"]}
        for key, ref in given.items():
            if ref is not None and missing_local(ref):
                raise FileNotFoundError(f"{key}: no such model directory {ref!r}")
        # the models a stage reads that no earlier stage of this command makes must exist now, not after hours
        self.stages = tuple(stages)
        made = set(self._roles(stages))
        needs = {"augment": [("original", "finetune")],
                 "unlearn": [("original", "finetune")] + ([("augmented", "augment")] if self._needs_augmented()
                                                          else [])}
        for stage in stages:
            for role, maker in needs.get(stage, []):
                if role not in made:
                    self._require(role, maker)
        if "unlearn" in stages and "refusals" in method_class(self.cfg["unlearn"]["method"]).uses:
            self.refusals = load_refusals(self.cfg["unlearn"]["refusals"])
        sizes = self._model_vocab_sizes(given)
        self.tokenizer = self._tokenizer()
        if sizes and len(self.tokenizer) > min(sizes.values()):
            raise ConfigError(f"model.tokenizer: has {len(self.tokenizer)} tokens but the models' vocab size is "
                              f"{min(sizes.values())}")

    def _check_engine(self, stages) -> None:
        """Each stage's batch splits over the launched processes (``WORLD_SIZE``, set by ``accelerate launch`` and
        ``torchrun``); under ``distributed.engine: fsdp2`` the stages' optimizers must take sharded tensors."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        for stage in stages:
            s = self.cfg[stage]
            if s["batch_size"] % (world * s["micro_batch_size"]):
                raise ConfigError(f"{stage}.batch_size: {s['batch_size']} must be divisible by processes x "
                                  f"micro_batch_size = {world} x {s['micro_batch_size']}; lower "
                                  f"{stage}.micro_batch_size or change the number of processes")
        if self.cfg["distributed"]["engine"] != "fsdp2":
            return
        for stage in stages:
            if self.cfg[stage]["optimizer"] != "adamw":  # BF16AdamW's arithmetic is written for whole tensors
                raise ConfigError(f"{stage}.optimizer: {self.cfg[stage]['optimizer']} is not supported under "
                                  "distributed.engine=fsdp2; use adamw with model.dtype=float32 (sharded over N "
                                  "processes, fp32 weights and AdamW states cost 16/N bytes per parameter)")

    def _check_checkpoint_engine(self, role: str, ckpt: Path) -> None:
        """A sharded checkpoint resumes only under fsdp2, and fsdp2 resumes only a sharded one."""
        sharded, fsdp2 = checkpoint.is_sharded(ckpt), self.cfg["distributed"]["engine"] == "fsdp2"
        if sharded != fsdp2:
            written = "distributed.engine=fsdp2" if sharded else "one process or DDP (distributed.engine=accelerate)"
            raise ConfigError(f"distributed.engine: the {role!r} checkpoint {ckpt} was written by {written}; resume "
                              "it with the engine that wrote it (its optimizer state is "
                              f"{'sharded' if sharded else 'whole'})")

    def _resume_point(self, role: str):
        """The intact checkpoint ``role`` resumes from (damaged newer ones reported), verified once per run."""
        if role not in self._resume_points:
            self._resume_points[role] = checkpoint.resume_point(self.dir / role / "checkpoints")
        return self._resume_points[role]

    def _has_outputs(self, roles) -> bool:
        """Whether any of ``roles`` has a final model or a checkpoint in this run dir."""
        return any((self.dir / r / "model").is_dir() or (self.dir / r / "checkpoints").is_dir() for r in roles)

    def _roles(self, stages):
        roles = []
        if "finetune" in stages:
            roles += ["original"] + (["oracle"] if self._makes_oracle() else [])
        if "augment" in stages and (self._needs_augmented() or "unlearn" not in stages):
            roles.append("augmented")
        if "unlearn" in stages:
            roles.append("unlearned")
        return roles

    def _needs_augmented(self) -> bool:
        """Whether the unlearning method reads the augmented model (RKLU/FKLU's teacher, TA, the teacher itself)."""
        return bool(method_class(self.cfg["unlearn"]["method"]).needs & {"teacher", "augmented"})

    def _uses_lora(self, role: str) -> bool:
        return self.cfg["lora"]["enabled"] and role in ("augmented", "unlearned")

    def _lora_config(self):
        c = self.cfg["lora"]
        return lora.lora_config(r=c["r"], alpha=c["alpha"], dropout=c["dropout"], target_modules=c["target_modules"])

    def _check_lora(self, stages) -> None:
        """LoRA: peft is installed, ``lora.target_modules`` match the model (on a weightless copy), and a resumed
        checkpoint is an adapter with the config's settings (or full weights when LoRA is off)."""
        wanted = None
        if self.cfg["lora"]["enabled"]:
            try:
                lora.require_peft()
            except ImportError as e:
                raise ConfigError(f"lora.enabled: {e}") from None
            try:
                targets = lora.target_modules_of(self._base_config(), self._lora_config())
            except ValueError as e:  # lora.target_modules matching nothing
                raise ConfigError(str(e)) from None
            wanted = {**self.cfg["lora"], "target_modules": targets}
        for role in self._roles(stages) if self.resume else ():
            if (self.dir / role / "model").is_dir() or (ckpt := self._resume_point(role)) is None:
                continue
            saved, where = lora.saved_settings(ckpt), f"the {role!r} checkpoint {ckpt}"
            if saved is not None and not self._uses_lora(role):
                raise ConfigError(f"lora.enabled: {where} holds a LoRA adapter (r={saved['r']}) but LoRA is off "
                                  "for this stage; resume with lora.enabled=true and its settings, or use a new "
                                  "run_dir")
            if saved is None and self._uses_lora(role):
                raise ConfigError(f"lora.enabled: {where} holds full model weights, not a LoRA adapter; resume "
                                  "with lora.enabled=false, or use a new run_dir")
            if saved is not None and (diffs := lora.settings_mismatch(saved, wanted)):
                raise ConfigError("; ".join(diffs) + f" ({where}); resume with the checkpoint's lora settings, "
                                  "or use a new run_dir")

    def _base_config(self):
        """The transformers config of the original's architecture (what adapters attach to)."""
        from transformers import AutoConfig

        key = "finetune.original" if self.cfg["finetune"]["original"] else "model.name_or_path"
        ref = self.cfg["finetune"]["original"] or self.cfg["model"]["name_or_path"]
        if ref is not None:
            if missing_local(ref):
                raise FileNotFoundError(f"{key}: no such model directory {ref!r}")
            return AutoConfig.from_pretrained(ref)
        spec = dict(self.cfg["model"]["random_init"])
        return AutoConfig.for_model(spec.pop("architecture"), **spec)

    def _makes_oracle(self) -> bool:
        return self.cfg["finetune"]["make_oracle"] and self.cfg["data"]["retain"] is not None

    def _model_vocab_sizes(self, given: dict) -> dict:
        """Vocab sizes of every model the run reads (from config.json only); they must all agree."""
        from transformers import AutoConfig

        sizes = {}
        for key, ref in given.items():
            if ref is not None:
                sizes[key] = from_pretrained(AutoConfig, key, ref).vocab_size
        for role in ROLES:
            folder = self.dir / role / "model"
            if folder.is_dir() and not lora.is_adapter_dir(folder) and not is_teacher_dir(folder):
                sizes[f"{role} ({self.dir / role / 'model'})"] = AutoConfig.from_pretrained(
                    self.dir / role / "model").vocab_size
        if len(set(sizes.values())) > 1:
            raise ConfigError(f"vocab mismatch between student and teacher models (vocab sizes: {sizes}); the "
                              "teacher is built token by token, so all models must share one tokenizer")
        return sizes

    def save_run_info(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        _replace(self.dir / "config.yaml", yaml.safe_dump(self.cfg, sort_keys=False))
        versions = {"python": platform.python_version()}
        for pkg in ("rklu_fast", "torch", "transformers", "accelerate", "tokenizers", "datasets", "triton"):
            try:
                versions[pkg] = metadata.version(pkg)
            except metadata.PackageNotFoundError:
                versions[pkg] = None
        _replace(self.dir / "versions.json", json.dumps(versions, indent=2) + "\n")

    # ------------------------------------------------------------------ data, tokenizer, models
    def _records(self):
        data = self.cfg["data"]
        if data["kind"] == "text":
            path = Path(data["text_file"])
            if not path.is_file():
                raise FileNotFoundError(f"data.text_file: no such file {str(path)!r}")
            return path.read_text(encoding="utf-8"), None
        forget = load_tofu(data["forget"], data["source"])
        retain = load_tofu(data["retain"], data["source"]) if data["retain"] else None
        if retain is not None and data["max_retain"] is not None:
            retain = retain[:data["max_retain"]]
        return forget, retain

    def _tokenizer(self):
        m = self.cfg["model"]
        if m["train_tokenizer"]:
            from rklu_fast.data.tokenizer import load_or_train_tokenizer

            def texts():
                if self.cfg["data"]["kind"] == "text":
                    return [self.forget_records]
                return [self.template.full(r["question"], r["answer"])
                        for r in self.forget_records + (self.retain_records or [])]

            tokenizer = load_or_train_tokenizer(self.dir / "tokenizer", texts, m["train_tokenizer"])
        else:
            from transformers import AutoTokenizer

            key = "model.tokenizer" if m["tokenizer"] else "model.name_or_path"
            tokenizer = from_pretrained(AutoTokenizer, key, m["tokenizer"] or m["name_or_path"])
        if tokenizer.pad_token is None:  # Llama-2 has none; TOFU pads with EOS (padding is masked anyway)
            tokenizer.pad_token = tokenizer.eos_token
        return tokenizer

    def encode(self, records) -> list[dict]:
        if isinstance(records, str):  # plain text (Harry Potter setting)
            chunks = chunk_text(self.tokenizer, records, self.cfg["data"]["chunk_length"])
            return [dict(c, index=i) for i, c in enumerate(chunks)]
        max_length = self.cfg["model"]["max_length"]
        return [dict(encode_qa(self.tokenizer, self.template, r["question"], r["answer"], max_length), index=i)
                for i, r in enumerate(records)]

    @property
    def accelerator(self):
        """accelerate's ``Accelerator``, or with ``distributed.engine: fsdp2`` rklu's FSDP2 one (distributed.py)."""
        if self._accelerator is None:
            from accelerate import Accelerator

            if (kind := _accelerate_sharding()) is not None:
                raise ConfigError(f"distributed.engine: this process was launched with an accelerate config of "
                                  f"distributed_type {kind}, which rklu does not use ({_NOT_DRIVEN[kind]}; "
                                  "docs/memory-and-scale.md); launch with configs/accelerate/fsdp.yaml and set "
                                  "distributed.engine=fsdp2, or with configs/accelerate/ddp.yaml")
            d, kwargs = self.cfg["distributed"], {"mixed_precision": self.cfg["precision"], "cpu": self.cfg["cpu"]}
            if d["engine"] == "fsdp2":
                try:
                    self._accelerator = distributed.FSDP2Accelerator(
                        reshard_after_forward=d["reshard_after_forward"], **kwargs)
                except ValueError as e:  # one process
                    raise ConfigError(str(e)) from None
            else:
                self._accelerator = Accelerator(**kwargs)
        return self._accelerator

    def model_path(self, role: str) -> str:
        given = {"original": self.cfg["finetune"]["original"], "oracle": self.cfg["finetune"]["oracle"],
                 "augmented": self.cfg["augment"]["model"]}.get(role)
        return given or str(self.dir / role / "model")

    def load_model(self, path: str | Path | None, dtype: torch.dtype | None = None):
        """``path`` in ``save_pretrained`` form or a hub id; ``None``: the base model (untrained for random_init).
        ``dtype``: default ``model.dtype``."""
        from transformers import AutoConfig, AutoModelForCausalLM

        m = self.cfg["model"]
        dtype = dtype or _DTYPES[m["dtype"]]
        if path is not None:  # a save_pretrained folder, a hub id, an adapter folder or a teacher manifest
            return load_causal_lm(path, dtype=dtype)
        if m["random_init"] is None:
            return AutoModelForCausalLM.from_pretrained(m["name_or_path"], dtype=dtype)
        spec = dict(m["random_init"])
        arch = spec.pop("architecture")
        tok = self.tokenizer
        vocab = spec.pop("vocab_size", len(tok))  # an architecture's own vocabulary may exceed the tokenizer's
        if vocab < len(tok):
            raise ConfigError(f"model.random_init.vocab_size: {vocab} < the tokenizer's {len(tok)} tokens")
        config = AutoConfig.for_model(arch, vocab_size=vocab, bos_token_id=tok.bos_token_id,
                                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, **spec)
        torch.manual_seed(self.cfg["seed"])  # the original and the oracle start from the same weights
        return AutoModelForCausalLM.from_config(config, dtype=dtype)

    # ------------------------------------------------------------------ stages
    def _train_role(self, role, init, method, forget, stage, **kwargs) -> bool:
        """Train one role unless it is done; returns False when stopped early (simulated kill)."""
        out = self.dir / role
        if (out / "model").is_dir():
            print(f"[rklu] {role}: done ({out / 'model'}), skipping")
            return True
        if self.stopped:
            return False
        resume_from = self._resume_point(role) if self.resume else None
        if resume_from is not None:
            print(f"[rklu] {role}: resuming from {resume_from}")
        # init: a model reference, or (LoRA) a function of the checkpoint to resume that builds the model; a
        # sharded checkpoint's weights are restored into the sharded model (loop.train), which starts from init
        weights = None if resume_from is None or checkpoint.is_sharded(resume_from) else resume_from
        model = init(weights) if callable(init) else self.load_model(weights if weights is not None else init)
        if callable(kwargs.get("frozen")):  # LoRA: the frozen views are adapter settings of the student's model
            kwargs["frozen"] = kwargs["frozen"](model)
        if "fused_linear" in kwargs:  # decided on the model itself: supported architecture, one process, CUDA
            setting = kwargs["fused_linear"]
            kwargs["fused_linear"], why = fused_linear_choice(setting, model, self.accelerator.device,
                                                               self.accelerator.num_processes > 1, method)
            if why and setting is not False:
                print(f"[rklu] {role}: {why}")
        torch.manual_seed(self.cfg["seed"])
        finished = loop.train(model, self.tokenizer, method, forget, stage, out, self.accelerator,
                              seed=self.cfg["seed"], resume_from=resume_from, stop_after_steps=self.stop_after_steps,
                              log_every=self.cfg["log"]["every"], tensorboard=self.cfg["log"]["tensorboard"],
                              keep_last=self.cfg["checkpoint"]["keep_last"],
                              save_checkpoints=self.cfg["checkpoint"]["every_epoch"], desc=role, **kwargs)
        if not finished:
            self.stopped = True
            print(f"[rklu] {role}: stopped after {self.stop_after_steps} steps; continue with --resume")
            return False
        full = distributed.export_state_dict(model)  # fsdp2: the shards gathered on the main process
        if self.accelerator.is_main_process:  # one writer in multi-process runs
            checkpoint.save_model(out / "model", self.accelerator.unwrap_model(model), self.tokenizer, full)
            if self._uses_lora(role) and self.cfg["lora"]["merge"]:  # a plain model for tools without peft
                merged = lora.merged_model(self.accelerator.unwrap_model(model)) if full is None else \
                    self._load_merged(str(out / "model"))  # a sharded model cannot merge in place
                checkpoint.save_model(out / "merged", merged, self.tokenizer)
        self.accelerator.wait_for_everyone()
        self.accelerator.free_memory()  # drop accelerate's references to this stage's model and optimizer
        print(f"[rklu] {role}: saved {out / 'model'}")
        return True

    def finetune(self) -> bool:
        """The original on retain ∪ forget (TOFU's ``full``) and the oracle on retain, from the base model."""
        if self.cfg["data"]["kind"] == "text":
            return True
        nll = make_method("nll")
        forget = self.encode(self.forget_records)
        retain = self.encode(self.retain_records) if self.retain_records else []
        ok = True
        if self.cfg["finetune"]["original"] is None:
            ok = self._train_role("original", None, nll, retain + forget, self.cfg["finetune"])
        if ok and self._makes_oracle() and self.cfg["finetune"]["oracle"] is None:
            ok = self._train_role("oracle", None, nll, retain, self.cfg["finetune"])
        return ok

    def augment(self) -> bool:
        """The augmented model: the original fine-tuned further on the forget set (skipped by ``rklu run`` when
        the unlearning method does not read it)."""
        if self.cfg["augment"]["model"] is not None:
            return True
        if "unlearn" in self.stages and not self._needs_augmented():
            print(f"[rklu] augmented: not needed by unlearn.method={self.cfg['unlearn']['method']}, skipping")
            return True
        self._require("original", "finetune")
        original = self.model_path("original")
        init = original
        if self._uses_lora("augmented"):  # an adapter on the original, whose weights stay frozen
            init = self._adapter_init(lora.AUGMENTED, lambda: self.load_model(original, self._frozen_dtype()))
        return self._train_role("augmented", init, make_method("nll"), self.encode(self.forget_records),
                                self.cfg["augment"])

    def _frozen_dtype(self) -> torch.dtype | None:
        """Frozen weights need no fp32 master copy: under bf16 autocast their matmuls run in bf16 anyway."""
        return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.cfg["precision"])

    def _adapter_init(self, name: str, load_base):
        """``_train_role``'s ``init`` in LoRA mode: the base from ``load_base()`` with a trainable adapter ``name``,
        fresh (seeded) or the adapter of the checkpoint being resumed."""
        def init(resume_from):
            model = load_base()
            torch.manual_seed(self.cfg["seed"])
            return lora.attach_adapter(model, name, self._lora_config(), resume_from,
                                       base=self.model_path("original"))
        return init

    def method(self):
        """The unlearning method of ``unlearn.method`` with its hyper-parameters (defaults per forget split)."""
        u = self.cfg["unlearn"]
        max_length = self.cfg["model"]["max_length"]
        ctx = MethodContext(alpha=u["alpha"], beta=u["beta"], delta=u["delta"], forget_weight=u["forget_weight"],
                            backend=u["backend"], seed=self.cfg["seed"], dpo_form=u["dpo_form"],
                            teacher_form=u["teacher_form"],
                            refusals=self.refusals,
                            encode=lambda q, a: encode_qa(self.tokenizer, self.template, q, a, max_length),
                            questions=[r["question"] for r in self.forget_records]
                            if self.cfg["data"]["kind"] == "tofu" else None)
        method = make_method(u["method"], ctx, forget_split=self.cfg["data"]["forget"])
        defaulted = [k for k in ("beta", "delta", "forget_weight") if k in method.uses and u[k] is None]
        if defaulted and self.accelerator.is_main_process:
            values = ", ".join(f"{k}={getattr(method.ctx, k)}" for k in defaulted)
            print(f"[rklu] unlearn: {method.name} with its defaults for {self.cfg['data']['forget']}: {values} "
                  "(set unlearn.<key> to change them)")
        return method

    def unlearn(self, on_epoch=None) -> bool:
        """The student starts from the original and trains with ``unlearn.method``; the stage builds only what
        the method (and the retain term) read: the teacher (online, or a one-pass cache of the frozen models'
        forget-set logits), the original's reference log-likelihoods, the original itself for the KL term.
        Methods that do not train (``ta``, ``teacher``) build the unlearned model from the two models.
        ``on_epoch(epoch, model)``: a hook at every epoch boundary (default: TOFU metrics with
        ``eval.every_epoch``; experiments pass their own)."""
        u = self.cfg["unlearn"]
        method = self.method()
        self._require("original", "finetune")
        if self._needs_augmented():
            self._require("augmented", "augment")
        if (self.dir / "unlearned" / "model").is_dir():
            print(f"[rklu] unlearned: done ({self.dir / 'unlearned' / 'model'}), skipping")
            return True
        if not method.trains:
            return self._build_untrained(method)
        device = self.accelerator.device
        forget = self.encode(self.forget_records)
        retain_term = make_retain_term(u["retain_term"], u["backend"], u["retain_kl_positions"])
        retain = self.encode(self.retain_records) if retain_term is not None else None
        needs_teacher = "teacher" in method.needs
        keep_original = retain_term is not None and "original" in retain_term.needs
        needs_original = needs_teacher or keep_original or "reference" in method.needs
        lora_mode = self._uses_lora("unlearned")
        if lora_mode:  # one base: original = adapters off, augmented = its adapter (lora.py)
            shared = self.load_model(self.model_path("original"), self._frozen_dtype())
            if needs_teacher:
                shared = lora.load_frozen_adapter(shared, self.model_path("augmented"))
            shared = shared.to(device)
            init = self._adapter_init(lora.STUDENT, lambda: shared)

            def frozen(student):  # views of the student's own PeftModel (built once the adapter is attached)
                original = lora.AdapterView(student, lora.ORIGINAL) if needs_original else None
                augmented = lora.AdapterView(student, lora.AUGMENTED) if needs_teacher else None
                return self._frozen(method, forget, original, augmented, keep_original)
        else:
            original = augmented = None
            if needs_original:
                original = self.load_model(self.model_path("original"), self._frozen_dtype()).to(device)
            if needs_teacher:
                augmented = self.load_model(self.model_path("augmented"), self._frozen_dtype()).to(device)
            # built before the student: a cached teacher frees both models first (peak memory)
            frozen = self._frozen(method, forget, original, augmented, keep_original)
            for model in frozen.models():  # fsdp2: the frozen models training still runs are sharded too
                distributed.shard_frozen(model, self.accelerator)
            del original, augmented
            init = self.model_path("original")
        finish = on_epoch is None and self.cfg["eval"]["every_epoch"]
        if finish:
            on_epoch = self._epoch_evaluation()
        done = self._train_role("unlearned", init, method, forget, u, frozen=frozen, retain_examples=retain,
                                retain_term=retain_term, retain_weight=u["retain_weight"],
                                forget_weight=method.ctx.forget_weight, on_epoch=on_epoch,
                                fused_linear=u["fused_linear"])
        if done and finish and on_epoch is not None:
            print(f"[rklu] per-epoch evaluation: {on_epoch.path}, {on_epoch.finish()}")
        return done

    def _frozen(self, method, forget: list[dict], original, augmented, keep_original: bool) -> Frozen:
        """The frozen quantities ``method`` and the retain term read (``rklu_fast.train.frozen``)."""
        teacher = reference = None
        if "teacher" in method.needs:
            check_same_vocab(original=original, augmented=augmented)
            if self.cfg["teacher"]["dtype"] == "float32":  # heads in fp32: the cache is then fp32 too
                fp32_head(original)
                fp32_head(augmented)
            acc, cache_dir = self.accelerator, self.cfg["teacher"]["cache_dir"]

            def build():
                return make_teacher(self.cfg["teacher"]["mode"], original, augmented, forget, template=self.template,
                                    pad_token_id=self.tokenizer.pad_token_id, device=acc.device, cache_dir=cache_dir,
                                    micro_batch_size=self.cfg["unlearn"]["micro_batch_size"],
                                    autocast=acc.autocast, form=self.cfg["unlearn"]["teacher_form"],
                                    store=self.cfg["teacher"]["store"], alpha=self.cfg["unlearn"]["alpha"])
            if cache_dir is not None and acc.num_processes > 1:  # one writer: the others memory-map its directory
                teacher = build() if acc.is_main_process else None
                acc.wait_for_everyone()
                teacher = teacher or build()
            else:
                teacher = build()
        if "reference" in method.needs:
            u = self.cfg["unlearn"]
            sequences = {}
            for epoch in range(loop.epochs_touched(len(forget), u["epochs"], u["batch_size"])):
                for example in forget:
                    views = method.views(example, epoch)
                    for name in method.reference_views:
                        sequences[views[name]["key"]] = views[name]
            reference = ReferenceLogProbs.build(original, sequences, pad_token_id=self.tokenizer.pad_token_id,
                                                device=self.accelerator.device, batch_size=u["micro_batch_size"],
                                                autocast=self.accelerator.autocast)
        return Frozen(teacher=teacher, original=original if keep_original else None, reference=reference)

    def _build_untrained(self, method) -> bool:
        """``ta`` / ``teacher``: the unlearned model from the original and the augmented model, no training."""
        out = self.dir / "unlearned" / "model"
        original, augmented = self.model_path("original"), self.model_path("augmented")
        model = method.build(original, augmented, self._load_merged)
        if self.accelerator.is_main_process:
            checkpoint.save_model(out, model, self.tokenizer)
        self.accelerator.wait_for_everyone()
        print(f"[rklu] unlearned ({method.name}): saved {out}")
        return True

    def _load_merged(self, reference: str):
        """A plain model of ``reference``; a LoRA adapter folder is merged into the original's weights."""
        if lora.is_adapter_dir(reference):
            base = self.load_model(self.model_path("original"))
            return lora.merged_model(lora.load_frozen_adapter(base, reference))
        return self.load_model(reference)

    def _epoch_evaluation(self):
        """The hook that evaluates the student at every epoch boundary (``eval.every_epoch``, main process only):
        TOFU metrics (``rklu_fast.eval.epochs``), forget quality against the oracle (the retain model) if any."""
        if not self.accelerator.is_main_process:
            return None
        from rklu_fast.eval.epochs import EpochEvaluation

        e, oracle = self.cfg["eval"], self.model_path("oracle")
        has_oracle = (self.cfg["finetune"]["oracle"] or self._makes_oracle()) and not missing_local(oracle)
        reference = self.load_model(oracle).to(self.accelerator.device) if has_oracle else None
        return EpochEvaluation(self.dir / "unlearned", self.tokenizer, self.template, reference=reference,
                               forget_split=self.cfg["data"]["forget"], source=e["source"], ds_size=e["ds_size"],
                               batch_size=e["batch_size"], max_new_tokens=e["max_new_tokens"])

    def _require(self, role: str, stage: str) -> None:
        path = self.model_path(role)
        if missing_local(path):
            raise FileNotFoundError(f"{role}: no model at {path}; run `rklu {stage}` first (or give its path "
                                    f"in the config)")

    def summary(self) -> dict:
        """Mean answer probability on forget and retain, original (before) vs unlearned (after); printed."""
        n = self.cfg["eval"]["max_examples"]
        sets = {"forget": self.encode(self.forget_records)[:n]}
        if self.retain_records:
            sets["retain"] = self.encode(self.retain_records)[:n]
        result = {}
        for label, role in (("before", "original"), ("after", "unlearned")):
            model = self.load_model(self.model_path(role)).to(self.accelerator.device)
            result[label] = {name: mean_answer_probability(model, ex, self.tokenizer.pad_token_id)
                             for name, ex in sets.items()}
        write_json(self.dir / "summary.json", result, indent=2)
        print("\nmean answer probability      " + "  ".join(f"{name:>8}" for name in sets))
        for label, role in (("before", "original"), ("after", "unlearned")):
            print(f"{label:>6} unlearning ({role:>9})  " + "  ".join(f"{result[label][k]:8.4f}" for k in sets))
        return result


# `accelerate launch` configs whose distributed_type would have accelerate shard the model, and why rklu does not
_NOT_DRIVEN = {"FSDP": "accelerate builds FSDP only on GPUs, so CI could not test it; rklu's fsdp2 engine runs the "
                       "same FSDP2 on GPUs and CPUs",
               "DEEPSPEED": "its ZeRO-2 reduces gradients at every micro-batch, steps the optimizer inside backward "
                            "and partitions the optimizer state, none of which rklu's loop and checkpoints handle"}


def _accelerate_sharding() -> str | None:
    """``FSDP`` or ``DEEPSPEED`` when ``accelerate launch`` was given a config of that distributed_type (it says so
    to the processes in ``ACCELERATE_USE_FSDP`` / ``ACCELERATE_USE_DEEPSPEED``), else ``None``."""
    for kind in _NOT_DRIVEN:
        if os.environ.get(f"ACCELERATE_USE_{kind}", "false").lower() == "true":
            return kind
    return None


def _replace(path: Path, text: str) -> None:
    """Write ``path`` whole or not at all (a temporary file renamed over it): every process of a multi-process run
    writes the run info while the others' pre-flight may be reading it."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def _with_defaults(config, defaults):
    """``config`` with the keys it lacks (recursively) taken from ``defaults``."""
    if not (isinstance(config, dict) and isinstance(defaults, dict)):
        return config
    return {**defaults, **{k: _with_defaults(v, defaults.get(k)) for k, v in config.items()}}


def _diff(old, new, prefix="") -> set[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        keys = set(old) | set(new)
        return set().union(*(_diff(old.get(k), new.get(k), f"{prefix}{k}.") for k in keys)) if keys else set()
    return {prefix.rstrip(".")} if old != new else set()
