"""LoRA mode: one copy of the base weights serves the original, the augmented model and the student.

With peft, the original ``m_o`` is the base model with adapters disabled, the augmented model ``m_aug`` is the
base plus an adapter named ``"augmented"`` (trained on the forget set in the augment stage), and the student is
the base plus an adapter named ``"student"`` (zero-initialised B, so it starts as ``m_o``, as the paper's student
does).  Full-parameter RKLU needs three models' weights (or a teacher cache); this needs one, plus two small
adapters.

``AdapterView`` presents one adapter setting of the shared model as an ordinary frozen model, so the teacher
sources of ``teacher.py`` / ``teacher_cache.py`` (online, cached, the ``KL`` retain term's original) work on it
unchanged; ``SharedBaseTeacher`` is the online one.  Adapter directories (final models and epoch checkpoints)
hold one adapter in peft's ``save_pretrained`` layout, loadable with ``PeftModel.from_pretrained`` or directly
with ``AutoModelForCausalLM.from_pretrained`` (transformers attaches it to the base named in
``adapter_config.json``).
"""
from __future__ import annotations

import json
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch

from rklu_fast.train.teacher import OnlineTeacher

ORIGINAL, AUGMENTED, STUDENT = None, "augmented", "student"
ADAPTER_CONFIG = "adapter_config.json"
# config key under `lora:` ↔ field of peft's adapter_config.json; a resumed adapter must match on all of them
_SAVED_FIELDS = {"r": "r", "alpha": "lora_alpha", "dropout": "lora_dropout", "target_modules": "target_modules"}


@contextmanager
def _quiet_peft_wrap():
    """peft (0.21) reads transformers' deprecated ``is_gradient_checkpointing`` whenever it wraps a model, and
    transformers then warns about peft's code: not the user's business, so that one warning is dropped here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        yield


def require_peft() -> None:
    try:
        import peft  # noqa: F401
    except ImportError:
        raise ImportError("LoRA mode needs peft: `pip install peft` (or `pip install rklu_fast[lora]`)") from None


def lora_config(r: int = 16, alpha: int = 32, dropout: float = 0.0, target_modules="all-linear",
                init_lora_weights=True):
    """A peft ``LoraConfig`` for causal LMs (all linear layers except the LM head by default)."""
    require_peft()
    from peft import LoraConfig

    if r <= 0:
        raise ValueError(f"lora.r: must be a positive rank, got {r!r}")
    return LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=target_modules,
                      init_lora_weights=init_lora_weights, task_type="CAUSAL_LM")


def add_adapter(model, name: str, config):
    """Add adapter ``name`` to ``model`` (wrapping a plain transformers model in a ``PeftModel`` first) and make
    it the active, trainable one; returns the ``PeftModel``.  Base weights are frozen by peft.  Target modules
    that match nothing raise a ``ValueError`` naming ``lora.target_modules``."""
    from peft import PeftModel, get_peft_model

    try:
        if isinstance(model, PeftModel):
            if name in model.peft_config:
                raise ValueError(f"adapter: {name!r} already exists on this model")
            model.add_adapter(name, config)
        else:
            with _quiet_peft_wrap():
                model = get_peft_model(model, config, adapter_name=name)
    except ValueError as e:
        if "not found in the base model" not in str(e):
            raise
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)})
        given = config.target_modules if isinstance(config.target_modules, str) else sorted(config.target_modules)
        raise ValueError(f"lora.target_modules: {given!r} matches no module of "
                         f"{type(model).__name__}; its linear layers are {linear} (or use all-linear)") from None
    model.set_adapter(name)
    return model


def target_modules_of(model_config, config) -> list[str]:
    """The module names ``config`` adapts in a model of ``model_config`` (a transformers config), found on a
    weightless (meta-device) copy: checks ``lora.target_modules`` before any weights are loaded."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        skeleton = add_adapter(AutoModelForCausalLM.from_config(model_config), "check", config)
    return sorted(skeleton.peft_config["check"].target_modules)


def attach_adapter(model, name: str, config, resume_from: str | Path | None = None, base: str | None = None):
    """``model`` with a trainable adapter ``name``: fresh from ``config``, or the adapter of the epoch checkpoint
    ``resume_from``.  ``base``: the base model's path or hub id, recorded in ``adapter_config.json`` so the saved
    adapter loads on its own (local paths made absolute)."""
    from peft import PeftModel

    if resume_from is None:
        model = add_adapter(model, name, config)
    elif isinstance(model, PeftModel):
        model.load_adapter(resume_from, adapter_name=name, is_trainable=True)
    else:
        with _quiet_peft_wrap():
            model = PeftModel.from_pretrained(model, resume_from, adapter_name=name, is_trainable=True)
    model.set_adapter(name)
    if base is not None:
        model.peft_config[name].base_model_name_or_path = str(Path(base).resolve()) if Path(base).exists() else base
    return model


def load_frozen_adapter(model, path: str | Path, name: str = AUGMENTED):
    """The base ``model`` with the saved adapter at ``path`` added as ``name``, frozen (the augmented model)."""
    from peft import PeftModel

    with _quiet_peft_wrap():
        model = PeftModel.from_pretrained(model, path, adapter_name=name, is_trainable=False)
    model.requires_grad_(False)
    return model


def save_adapter(directory: str | Path, model, name: str | None = None) -> None:
    """Adapter ``name`` (default: the active one) of a ``PeftModel`` in peft's ``save_pretrained`` layout at
    ``directory``, written atomically with a manifest, as checkpoints are (``checkpoint.atomic_directory``)."""
    from rklu_fast.train.checkpoint import atomic_directory, write_manifest

    with atomic_directory(directory) as tmp:
        write_adapter(tmp, model, name)
        write_manifest(tmp)


def write_adapter(directory: str | Path, model, name: str | None = None, state_dict: dict | None = None) -> None:
    """``save_adapter``'s files written straight into ``directory`` (which a checkpoint writer makes atomic), at
    its top: peft puts adapters not named "default" in a sub-folder; moved up here.  ``state_dict``: the weights
    to take the adapter from instead of the model's own (a sharded model's gathered state dict)."""
    directory, name = Path(directory), name or model.active_adapter
    model.save_pretrained(directory, selected_adapters=[name], **({} if state_dict is None else
                                                                  {"state_dict": state_dict}))
    if name != "default":
        for f in (directory / name).iterdir():
            f.replace(directory / f.name)
        (directory / name).rmdir()


def is_adapter_dir(path: str | Path) -> bool:
    return (Path(path) / ADAPTER_CONFIG).is_file()


def saved_settings(path: str | Path) -> dict | None:
    """The ``lora`` settings (r, alpha, dropout, target_modules) an adapter directory was trained with, or
    ``None`` when ``path`` holds a full model."""
    if not is_adapter_dir(path):
        return None
    saved = json.loads((Path(path) / ADAPTER_CONFIG).read_text())
    settings = {key: saved.get(field) for key, field in _SAVED_FIELDS.items()}
    settings["target_modules"] = sorted(settings["target_modules"] or [])
    return settings


def settings_mismatch(saved: dict, wanted: dict) -> list[str]:
    """``lora.<key>: …`` for every setting that differs between a saved adapter and the run's config."""
    return [f"lora.{k}: the checkpoint has {saved[k]!r}, the config asks for {wanted[k]!r}"
            for k in _SAVED_FIELDS if saved[k] != wanted[k]]


def merged_model(model, name: str | None = None):
    """A plain transformers model with adapter ``name`` (default: the active one) merged into the base weights;
    consumes ``model`` (peft merges in place and removes every adapter)."""
    return model.merge_and_unload(adapter_names=[name or model.active_adapter])


@contextmanager
def active_adapter(model, name: str | None):
    """Run the body with adapter ``name`` active (``None``: all adapters disabled, i.e. the base model), then
    restore the previously active adapter and its trainability."""
    previous = model.active_adapter
    if name is None:
        with model.disable_adapter():
            yield model
        return
    model.set_adapter(name, inference_mode=True)
    try:
        yield model
    finally:
        model.set_adapter(previous)  # trainable again, as before


class AdapterView(torch.nn.Module):
    """The shared ``PeftModel`` with adapter ``name`` active (``None``: adapters off = the original) as a frozen
    model of its own: ``forward`` runs under that adapter in eval mode (no dropout) and restores the student's;
    ``state_dict`` holds the weights it computes with (base + that adapter), which is what teacher-cache
    fingerprints read.  The shared model is not a sub-module, so ``eval()``/``requires_grad_(False)``/``.to()``
    on a view leave the student's adapter alone."""

    def __init__(self, model, name: str | None):
        super().__init__()
        if name is not None and name not in model.peft_config:
            raise ValueError(f"model: no adapter named {name!r}; train one in the augment stage (LoRA mode)")
        self.__dict__["shared"] = model  # bypass Module.__setattr__: not registered as a sub-module
        self.name, self.config = name, model.get_base_model().config

    @torch.no_grad()
    def forward(self, input_ids, attention_mask=None):
        with active_adapter(self.shared, self.name):
            was_training = self.shared.training
            self.shared.eval()
            try:
                return self.shared(input_ids=input_ids, attention_mask=attention_mask)
            finally:
                self.shared.train(was_training)

    def state_dict(self, *args, **kwargs):
        return {k: v for k, v in self.shared.state_dict().items()
                if "lora_" not in k or (self.name is not None and f".{self.name}." in k)}


class SharedBaseTeacher(OnlineTeacher):
    """Online teacher from the shared-base ``PeftModel``: original = adapters off, augmented = ``"augmented"``."""

    def __init__(self, model, augmented: str = AUGMENTED):
        super().__init__(AdapterView(model, ORIGINAL), AdapterView(model, augmented))
