"""Run configuration: built-in defaults ← a YAML file ← dotted ``key=value`` overrides from the command line.

Every key is checked against the defaults (unknown keys and wrong types are errors naming the key), so a typo
fails before any compute.  The resolved config is a plain nested dict and is saved with every run.
"""
from __future__ import annotations

import copy
import re
from pathlib import Path

import yaml


class ConfigError(ValueError):
    """A bad configuration: raised before any compute, the message names the key."""


class _Loader(yaml.SafeLoader):
    """``yaml.SafeLoader`` reading every decimal float spelling as a float: PyYAML follows YAML 1.1, whose float
    pattern needs a dot and a signed exponent, so ``1e-5`` and ``5E-3`` would stay strings.  Used for the config
    file and the command-line overrides alike."""


_FLOAT_TAG = "tag:yaml.org,2002:float"
_Loader.yaml_implicit_resolvers = {first: [r for r in resolvers if r[0] != _FLOAT_TAG]
                                   for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_Loader.add_implicit_resolver(_FLOAT_TAG, re.compile(r"""^(?:
      [-+]?[0-9][0-9_]*\.[0-9_]*(?:[eE][-+]?[0-9]+)?    # 1.5  1.  1.5e-3  1_000.5
    | [-+]?\.[0-9][0-9_]*(?:[eE][-+]?[0-9]+)?          # .5  .5e-3
    | [-+]?[0-9][0-9_]*[eE][-+]?[0-9]+                  # 1e-5  5E-3  1e5
    | [-+]?\.(?:inf|Inf|INF) | \.(?:nan|NaN|NAN))$""", re.X), list("-+0123456789."))


def _yaml_load(text: str):
    return yaml.load(text, Loader=_Loader)


def _optim(epochs: float, lr: float) -> dict:
    # The paper's defaults (and TOFU's): AdamW, wd 0.01, effective batch 32, linear warm-up over the first epoch,
    # then linear decay; HF Trainer's default gradient clipping at 1.0, which TOFU's runs used.
    return {"epochs": float(epochs), "lr": lr, "weight_decay": 0.01, "batch_size": 32, "micro_batch_size": 4,
            "warmup_epochs": 1.0, "max_grad_norm": 1.0,
            # memory options (docs/memory-and-scale.md): adamw | adamw_bf16 (bf16 weights: model.dtype=bfloat16)
            # | adamw_8bit; bf16_update: kahan | stochastic (how adamw_bf16 lands small updates)
            "optimizer": "adamw", "bf16_update": "kahan", "gradient_checkpointing": False}


DEFAULTS: dict = {
    "run_dir": "runs/default",      # everything a run writes: models, checkpoints, logs, resolved config
    "seed": 0,
    "precision": "bf16",            # accelerate mixed precision: bf16 | fp16 | no
    "cpu": False,                   # force the CPU even when a GPU is present
    "threads": None,                # torch intra-op CPU threads (tiny models on a shared CPU: 1 is fastest)
    "model": {
        "name_or_path": None,       # base model (hub id or local path) that `finetune` starts from
        "tokenizer": None,          # hub id / path; default: name_or_path
        "template": "llama2",       # prompt template: llama2 | phi | plain
        "max_length": 500,          # TOFU's max_length: longer QA pairs are truncated (and get no EOS)
        "dtype": "float32",         # dtype the weights are loaded in (master weights; compute follows precision)
        "random_init": None,        # {architecture: llama|phi, hidden_size: ..., ...}: build untrained from a config
        "train_tokenizer": None,    # vocab size: train a BPE on the TOFU text, cached in <run_dir>/tokenizer
    },
    "data": {
        "kind": "tofu",             # tofu (QA pairs) | text (plain text cut in chunks, the Harry Potter setting)
        "source": None,             # TOFU folder / JSON(L) file / hub id; default rklu_fast.data.default_data_dir()
        "forget": "forget10",       # TOFU forget split
        "retain": "retain90",       # TOFU retain split, or null for no retain set (and no retain term)
        "max_retain": None,         # keep only the first N retain examples (tiny runs)
        "text_file": None,          # kind=text: the forget text
        "chunk_length": 512,        # kind=text: tokens per chunk
    },
    # Stage 1: the original model (on retain ∪ forget = TOFU's `full`) and the oracle (on retain).
    "finetune": {"original": None, "oracle": None, "make_oracle": True, **_optim(5, 1e-5)},
    # Stage 2: the augmented model: the original fine-tuned further on the forget set.
    "augment": {"model": None, **_optim(10, 1e-5)},
    # Stage 3: the student starts from the original and trains with `method` (`rklu methods` lists them; RKLU
    # distils from the teacher l_o - alpha*relu(l_aug - l_o)). beta/delta/forget_weight: null = the method's
    # default (docs/methods.md); refusals: the IDK/DPO refusal file (null: TOFU's idontknow.jsonl);
    # retain_kl_positions: answer | all (TOFU's code); dpo_form: tofu | open-unlearning (x 2/beta);
    # teacher_form: logits (the paper's) | logprobs | centered_mean | centered_median (docs/methods.md).
    # fused_linear: auto (on CUDA for supported models) | true | false: RKLU/FKLU from hidden states and the LM
    # head, never forming the student's logits (docs/fused-linear.md); unsupported models fall back, saying why.
    "unlearn": {"method": "rklu", "alpha": 8.0, "retain_term": "RT", "retain_weight": 1.0, "backend": "auto",
                "beta": None, "delta": None, "forget_weight": None, "refusals": None,
                "retain_kl_positions": "answer", "dpo_form": "tofu", "teacher_form": "logits",
                "fused_linear": "auto", **_optim(10, 1e-5)},
    # Teacher source of `unlearn` (docs/memory-and-scale.md): online (both models run every step) | cached (one
    # forward over the forget set, then the models are freed) | auto (cached when it fits in half the free host
    # memory, or when cache_dir is set). cache_dir: memory-map the cache there (reused if it matches the run).
    # dtype: auto (the frozen models' output dtype: bf16 under bf16 precision) | float32 (their LM heads computed
    # in fp32 and the cache stored in fp32: α multiplies the heads' bf16 rounding, docs/methods.md "Precision").
    # store: combined (the cache holds the teacher l_t: half the memory, α fixed) | pair (l_o and l_aug: α sweeps
    # reuse one cache_dir).
    "teacher": {"mode": "auto", "cache_dir": None, "dtype": "auto", "store": "combined"},
    # LoRA (docs/pipeline.md): augment trains an adapter on the original, unlearn trains the student as a second
    # adapter; original = adapters off, so one copy of the base weights serves all three. finetune stays full.
    # target_modules: all-linear or a list of module names (q_proj, v_proj, ...); merge: also write <role>/merged/.
    "lora": {"enabled": False, "r": 16, "alpha": 32, "dropout": 0.0, "target_modules": "all-linear", "merge": False},
    "log": {"every": 1, "tensorboard": True},
    # How several processes (`accelerate launch`) train (docs/memory-and-scale.md): accelerate (as its launch config
    # says: one process, DDP, DeepSpeed) | fsdp2 (rklu's FSDP2 engine: the student and the online frozen models
    # sharded per decoder layer; with configs/accelerate/fsdp.yaml).  reshard_after_forward: fsdp2 frees each
    # layer's gathered weights after its forward (false: keeps them until backward, less communication).
    "distributed": {"engine": "accelerate", "reshard_after_forward": True},
    # keep_last: intact epoch checkpoints kept per stage (the final model is always kept); with 2, a damaged latest
    # one still leaves one to resume from.  1 halves the disk a 7B run needs (≈ 40 GB per full checkpoint).
    # every_epoch: false writes no epoch checkpoints (a killed stage then restarts; benchmarks/whole_run.py).
    "checkpoint": {"keep_last": 2, "every_epoch": True},
    # max_examples: examples per set for the before/after answer-probability summary.  every_epoch: TOFU metrics
    # of the unlearning student at every epoch boundary (docs/evaluation.md) on the first ds_size rows per split
    # (TOFU: 300), data from source (null: the default TOFU folder); max_new_tokens caps generations (null: TOFU's
    # max_length-200 rule); forget quality compares with the oracle when the run has one.
    "eval": {"max_examples": 200, "every_epoch": False, "ds_size": 300, "batch_size": 16, "max_new_tokens": None,
             "source": None},
    # `rklu experiment ...` settings (rklu_fast/experiments/); a free-form mapping the stages never read.
    "experiment": None,
}
# Keys whose default is null (the method's default) but that take a number when set.
_OPTIONAL_NUMBERS = {("unlearn", "beta"), ("unlearn", "delta"), ("unlearn", "forget_weight")}
# Keys whose default is null but that take a string (a path) when set.
_OPTIONAL_STRINGS = {("unlearn", "refusals")}
# Keys that may be set to null (off) although their default is a number.
_NULLABLE = {"max_grad_norm", "max_examples", "retain"}
# Keys whose value is a free-form mapping (not checked key by key).
_FREE = {("model", "random_init"), ("experiment",)}
# Keys that take true, false or "auto".
_BOOL_OR_AUTO = {("unlearn", "fused_linear")}
# Keys that take a string or a list of strings.
_STR_OR_LIST = {("lora", "target_modules")}
_CHOICES = {
    ("precision",): ("bf16", "fp16", "no"),
    ("model", "template"): ("llama2", "phi", "plain"),
    ("data", "kind"): ("tofu", "text"),
    ("unlearn", "retain_term"): ("RT", "KL", "none"),
    ("unlearn", "retain_kl_positions"): ("answer", "all"),
    ("unlearn", "dpo_form"): ("tofu", "open-unlearning"),
    ("model", "dtype"): ("float32", "bfloat16", "float16"),
    ("teacher", "mode"): ("auto", "online", "cached"),
    ("teacher", "dtype"): ("auto", "float32"),
    ("teacher", "store"): ("combined", "pair"),
    ("distributed", "engine"): ("accelerate", "fsdp2"),
    **{(stage, "optimizer"): ("adamw", "adamw_bf16", "adamw_8bit") for stage in ("finetune", "augment", "unlearn")},
    **{(stage, "bf16_update"): ("kahan", "stochastic") for stage in ("finetune", "augment", "unlearn")},
}


def _merge(base: dict, update: dict, prefix: tuple = (), into_free: bool = False) -> None:
    """``update`` into ``base`` (checked keys).  A free section (``_FREE``) given whole replaces the one before;
    with ``into_free`` (an override of a key inside it, ``experiment.jobs=1``) it is merged key by key."""
    if not isinstance(update, dict):
        raise ConfigError(f"{'.'.join(prefix) or 'config'}: must be a mapping, got {type(update).__name__}")
    for key, value in update.items():
        path = prefix + (str(key),)
        name = ".".join(path)
        if key not in base:
            raise ConfigError(f"{name}: unknown key; valid keys here: {sorted(base)}")
        if isinstance(base[key], dict) and path not in _FREE:
            _merge(base[key], value, path, into_free)
        elif into_free and isinstance(base[key], dict) and isinstance(value, dict):
            base[key] = _merge_free(base[key], value)
        else:
            base[key] = value


def _merge_free(base: dict, update: dict) -> dict:
    """``update`` merged into a copy of ``base`` key by key (nested mappings too), so that an override such as
    ``experiment.jobs=1`` changes one key of a free section, not the whole section."""
    out = dict(base)
    for key, value in update.items():
        out[key] = _merge_free(out[key], value) if isinstance(out.get(key), dict) and isinstance(value, dict) \
            else value
    return out


def _set_dotted(config: dict, assignment: str) -> None:
    if "=" not in assignment:
        raise ConfigError(f"override {assignment!r}: expected key=value, e.g. unlearn.epochs=2")
    key, raw = assignment.split("=", 1)
    try:
        value = _yaml_load(raw) if raw.strip() else None
    except yaml.YAMLError as e:
        raise ConfigError(f"override {assignment!r}: the value is not valid YAML: {e}") from None
    update: dict = {}
    node = update
    parts = key.strip().split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    _merge(config, update, into_free=tuple(parts) not in _FREE)


_KIND = {int: "an integer (e.g. 2, not 2.0)", bool: "true or false", str: "a string"}


def _check_types(config: dict, defaults: dict, prefix: tuple = ()) -> None:
    for key, default in defaults.items():
        path = prefix + (key,)
        name, value = ".".join(path), config[key]
        if isinstance(default, dict) and path not in _FREE:
            _check_types(value, default, path)
            continue
        if path in _FREE and value is not None and not isinstance(value, dict):
            raise ConfigError(f"{name}: must be a mapping or null, got {value!r}")
        if path in _OPTIONAL_NUMBERS and value is not None and (isinstance(value, bool)
                                                                or not isinstance(value, (int, float))):
            raise ConfigError(f"{name}: must be a number or null (the method's default), got {value!r}")
        if path in _OPTIONAL_STRINGS and value is not None and not isinstance(value, str):
            raise ConfigError(f"{name}: must be a path or null, got {value!r}")
        if path in _BOOL_OR_AUTO:
            if not (isinstance(value, bool) or value == "auto"):
                raise ConfigError(f"{name}: must be true, false or auto, got {value!r}")
            continue
        if default is None or (value is None and key in _NULLABLE):
            continue
        if path in _STR_OR_LIST:
            if not (isinstance(value, str) or isinstance(value, list) and value
                    and all(isinstance(v, str) for v in value)):
                raise ConfigError(f"{name}: must be a string or a non-empty list of strings, got {value!r}")
            continue
        expected = (int, float) if isinstance(default, float) else type(default)
        if isinstance(value, bool) and expected is not bool or not isinstance(value, expected):
            raise ConfigError(f"{name}: must be {_KIND.get(expected, 'a number')}, got {value!r}")
        if path in _CHOICES and value not in _CHOICES[path]:
            raise ConfigError(f"{name}: must be one of {list(_CHOICES[path])}, got {value!r}")


def _check_values(c: dict) -> None:
    for stage in ("finetune", "augment", "unlearn"):
        s = c[stage]
        for key in ("epochs", "lr", "batch_size", "micro_batch_size"):
            if s[key] <= 0:
                raise ConfigError(f"{stage}.{key}: must be positive, got {s[key]!r}")
        if s["batch_size"] % s["micro_batch_size"]:
            raise ConfigError(f"{stage}.batch_size: {s['batch_size']} is not a multiple of "
                              f"{stage}.micro_batch_size {s['micro_batch_size']}")
        if s["weight_decay"] < 0 or s["warmup_epochs"] < 0:
            raise ConfigError(f"{stage}: weight_decay and warmup_epochs must be ≥ 0")
        if c["lora"]["enabled"] and stage != "finetune":  # adapters train in fp32 whatever the base's dtype
            if s["optimizer"] == "adamw_bf16":
                raise ConfigError(f"{stage}.optimizer: adamw_bf16 is for bf16 weights; LoRA adapters are fp32, "
                                  "use adamw (or adamw_8bit)")
            continue
        if s["optimizer"] == "adamw_bf16" and c["model"]["dtype"] != "bfloat16":
            raise ConfigError(f"{stage}.optimizer: adamw_bf16 is for bf16 weights; set model.dtype=bfloat16 "
                              f"(got {c['model']['dtype']!r}) or use adamw")
        if s["optimizer"] == "adamw" and c["model"]["dtype"] == "bfloat16":
            raise ConfigError(f"{stage}.optimizer: plain adamw on bf16 weights rounds updates of lr ~1e-5 away "
                              "(docs/memory-and-scale.md); use adamw_bf16 (or adamw_8bit), or model.dtype=float32")
    if c["model"]["name_or_path"] is None and c["model"]["random_init"] is None:
        raise ConfigError("model.name_or_path: set a hub id / path, or model.random_init for an untrained model")
    if c["model"]["random_init"] is not None and "architecture" not in c["model"]["random_init"]:
        raise ConfigError("model.random_init.architecture: required (llama or phi)")
    if c["model"]["name_or_path"] is None and c["model"]["tokenizer"] is None and not c["model"]["train_tokenizer"]:
        raise ConfigError("model.tokenizer: set a tokenizer (hub id / path) or model.train_tokenizer (vocab size)")
    if c["model"]["tokenizer"] is not None and c["model"]["train_tokenizer"]:
        raise ConfigError("model.tokenizer: set either model.tokenizer or model.train_tokenizer, not both")
    if c["data"]["kind"] == "text":
        if not c["data"]["text_file"]:
            raise ConfigError("data.text_file: required when data.kind is 'text'")
        if not c["finetune"]["original"]:
            raise ConfigError("finetune.original: required when data.kind is 'text' (there is no QA set to "
                              "fine-tune on; the paper unlearns Harry Potter from the base model)")
    if c["data"]["retain"] is None and c["unlearn"]["retain_term"] != "none":
        raise ConfigError(f"unlearn.retain_term: {c['unlearn']['retain_term']!r} needs data.retain; "
                          "set unlearn.retain_term=none or give a retain split")
    keep = c["checkpoint"]["keep_last"]
    if keep < 1:
        raise ConfigError(f"checkpoint.keep_last: must be ≥ 1 (1 keeps only the latest epoch checkpoint), got {keep!r}")
    threads = c["threads"]
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise ConfigError(f"threads: must be a positive int or null, got {threads!r}")
    u = c["unlearn"]
    from rklu_fast.train.methods import METHODS  # the registry (imported here: torch is heavy for `rklu --help`)

    if u["method"] not in METHODS:
        raise ConfigError(f"unlearn.method: unknown method {u['method']!r}; choose one of {list(METHODS)} "
                          "(`rklu methods` describes them)")
    from rklu_fast.reference import TEACHER_FORMS

    if u["teacher_form"] not in TEACHER_FORMS:
        raise ConfigError(f"unlearn.teacher_form: must be one of {list(TEACHER_FORMS)}, got {u['teacher_form']!r}")
    if u["alpha"] < 0:
        raise ConfigError(f"unlearn.alpha: must be ≥ 0, got {u['alpha']!r}")
    if u["beta"] is not None and u["beta"] <= 0:
        raise ConfigError(f"unlearn.beta: must be > 0, got {u['beta']!r}")
    if u["forget_weight"] is not None and u["forget_weight"] < 0:
        raise ConfigError(f"unlearn.forget_weight: must be ≥ 0, got {u['forget_weight']!r}")
    if u["retain_weight"] < 0:
        raise ConfigError(f"unlearn.retain_weight: must be ≥ 0, got {u['retain_weight']!r}")
    if "refusals" in METHODS[u["method"]].uses and c["data"]["kind"] != "tofu":
        raise ConfigError(f"unlearn.method: {u['method']!r} pairs forget questions with refusals; it needs "
                          "data.kind tofu (question-answer pairs)")
    ev = c["eval"]
    for key in ("ds_size", "batch_size", "max_new_tokens"):
        if ev[key] is not None and (isinstance(ev[key], bool) or not isinstance(ev[key], int) or ev[key] < 1):
            raise ConfigError(f"eval.{key}: must be a positive int, got {ev[key]!r}")
    if ev["every_epoch"]:
        from rklu_fast.eval.tofu import FORGET_SPLITS  # the forget splits TOFU has perturbed answers for

        if c["data"]["kind"] != "tofu" or c["data"]["forget"] not in FORGET_SPLITS:
            raise ConfigError(f"eval.every_epoch: TOFU metrics need data.kind tofu and data.forget one of "
                              f"{list(FORGET_SPLITS)}, got kind {c['data']['kind']!r}, forget "
                              f"{c['data']['forget']!r}")
    if c["distributed"]["engine"] == "fsdp2":
        if c["precision"] == "fp16":
            raise ConfigError("precision: fp16 needs a loss scaler that distributed.engine=fsdp2 does not drive; use "
                              "bf16 (or no)")
        if ev["every_epoch"]:
            raise ConfigError("eval.every_epoch: per-epoch evaluation runs on the main process alone and cannot run "
                              "a model sharded by distributed.engine=fsdp2; evaluate the saved model instead")
    lora = c["lora"]
    if lora["enabled"] and c["teacher"]["dtype"] == "float32":
        raise ConfigError("teacher.dtype: float32 heads are not available with LoRA (the frozen views share the "
                          "student's LM head); use teacher.dtype=auto or full-parameter unlearning")
    if lora["enabled"]:
        if isinstance(lora["r"], bool) or not isinstance(lora["r"], int) or lora["r"] < 1:
            raise ConfigError(f"lora.r: must be a positive int, got {lora['r']!r}")
        if lora["alpha"] <= 0 or not 0 <= lora["dropout"] < 1:
            raise ConfigError(f"lora.alpha, lora.dropout: need alpha > 0 and 0 ≤ dropout < 1, got "
                              f"{lora['alpha']!r}, {lora['dropout']!r}")
        if c["augment"]["model"] is not None:
            raise ConfigError("augment.model: LoRA mode trains the augmented adapter on the original itself; set "
                              "augment.model=null or lora.enabled=false")


def load_config(path: str | Path | None = None, overrides: list[str] | tuple = ()) -> dict:
    """Defaults, updated by the YAML file at ``path`` (if any), then by ``key=value`` overrides; checked."""
    config = copy.deepcopy(DEFAULTS)
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config: no such file {str(path)!r}")
        try:
            data = _yaml_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config: {path} is not valid YAML: {e}") from None
        _merge(config, data)
    for assignment in overrides:
        _set_dotted(config, assignment)
    if config["precision"] is False:  # YAML reads a bare `no` as false
        config["precision"] = "no"
    _check_types(config, DEFAULTS)
    _check_values(config)
    return config
