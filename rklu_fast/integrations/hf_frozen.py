"""The frozen side of unlearning in a Trainer script: the ``Frozen`` object the method plug-ins read, built from the
models and caches a script has (the frozen original and augmented models, or a teacher cache written by the
toolkit), with errors that name the argument to fix.  It builds what ``rklu_fast.train.pipeline`` builds for the
unlearn stage, from Python objects instead of a run directory."""
from __future__ import annotations

import contextlib
from pathlib import Path

from rklu_fast.train.frozen import Frozen, ReferenceLogProbs
from rklu_fast.train.teacher import check_same_vocab
from rklu_fast.train.teacher_cache import (STORES, TEACHER_MODES, CachedTeacher, StaleTeacherCache, TeacherCache,
                                           data_fingerprint, make_teacher, place_cache)


def cached_teacher(teacher_cache, forget: list[dict], student, device, method=None) -> CachedTeacher:
    """A ``TeacherCache`` (or the directory the toolkit wrote it to, ``teacher.cache_dir``) checked against the
    training forget set — its data fingerprint (token ids and labels of every example, in index order) and the
    student's vocabulary must match — and against ``method``'s teacher form and, for a combined cache (the
    teacher itself, α baked in), its α."""
    if isinstance(teacher_cache, (str, Path)):
        if not (Path(teacher_cache) / "meta.json").is_file():
            raise FileNotFoundError(f"teacher_cache: no teacher cache in {str(teacher_cache)!r} (no meta.json); "
                                    "pass the directory a toolkit run wrote (teacher.cache_dir) or a TeacherCache")
        teacher_cache = TeacherCache.load(teacher_cache)
    if not isinstance(teacher_cache, TeacherCache):
        raise TypeError(f"teacher_cache: expected a TeacherCache or a cache directory, got "
                        f"{type(teacher_cache).__name__}")
    want = data_fingerprint(forget)
    if teacher_cache.key.data != want:
        raise StaleTeacherCache(f"teacher_cache: built for another forget set (data fingerprint "
                                f"{teacher_cache.key.data}; train_dataset's forget set is {want}: other examples, "
                                "tokenizer, template or max_length); rebuild it for this dataset "
                                "(rklu_fast.train.teacher_cache.build_forget_cache) or pass original= and augmented=")
    if teacher_cache.num_examples != len(forget):
        raise StaleTeacherCache(f"teacher_cache: holds {teacher_cache.num_examples} examples, the forget set "
                                f"{len(forget)}")
    vocab = getattr(getattr(student, "config", None), "vocab_size", None)
    if vocab is not None and vocab != teacher_cache.key.vocab_size:
        raise ValueError(f"teacher_cache: vocabulary of {teacher_cache.key.vocab_size} tokens, the model's is {vocab}")
    key, ctx = teacher_cache.key, getattr(method, "ctx", None)
    if ctx is not None and key.teacher_form != ctx.teacher_form:
        raise StaleTeacherCache(f"teacher_cache: holds the {key.teacher_form!r} teacher form, the method uses "
                                f"{ctx.teacher_form!r} (method_args['teacher_form'])")
    if ctx is not None and key.store == "combined" and key.alpha != ctx.alpha:
        raise StaleTeacherCache(f"teacher_cache: holds the teacher formed with α = {key.alpha}, the method uses "
                                f"α = {ctx.alpha} (method_args['alpha']); rebuild it or pass that α")
    return CachedTeacher(place_cache(teacher_cache, device), forget)


def build_frozen(method, retain_term, student, *, forget: list[dict], original=None, augmented=None,
                 teacher_cache=None, teacher_mode: str = "auto", teacher_store: str = "combined", template=None,
                 pad_token_id: int, device, micro_batch_size: int, reference_epochs: int,
                 autocast=contextlib.nullcontext) -> Frozen:
    """What ``method`` (``needs``) and ``retain_term`` read, on ``device``; raises before any training when an
    input is missing or belongs to something else.

    teacher (RKLU, FKLU): ``teacher_cache``, else the ``original`` and ``augmented`` models through
    ``make_teacher(teacher_mode, ...)`` (``online``, ``cached`` or ``auto``, as the toolkit's ``teacher.mode``; a
    cache holds the ``combined`` teacher or the ``pair`` of logits, ``teacher.store``), in the method's form.
    reference (NPO, IdkDPO): the original's log-likelihood of every sequence the first ``reference_epochs``
    epochs train on.  The ``KL`` retain term: the original itself.
    """
    if teacher_mode not in TEACHER_MODES:
        raise ValueError(f"teacher_mode: must be one of {TEACHER_MODES}, got {teacher_mode!r}")
    if teacher_store not in STORES:
        raise ValueError(f"teacher_store: must be one of {STORES}, got {teacher_store!r}")
    teacher = reference = None
    if "teacher" in method.needs:
        if teacher_cache is not None:
            if augmented is not None:
                raise ValueError("augmented: give the teacher as teacher_cache= or as original= and augmented=, "
                                 "not both")
            teacher = cached_teacher(teacher_cache, forget, student, device, method)
        else:
            missing = [name for name, m in (("original", original), ("augmented", augmented)) if m is None]
            if missing:
                raise ValueError(f"{' and '.join(missing)}: method {method.name!r} distils from the unlearning "
                                 "teacher l_o − α·relu(l_aug − l_o); pass original= and augmented= (the frozen "
                                 "original and augmented models) or teacher_cache= (a cache built by the toolkit)")
            check_same_vocab(student=student, original=original, augmented=augmented)
            teacher = make_teacher(teacher_mode, original, augmented, forget, template=template or "unknown",
                                   pad_token_id=pad_token_id, device=device, micro_batch_size=micro_batch_size,
                                   autocast=autocast, form=method.ctx.teacher_form, store=teacher_store,
                                   alpha=method.ctx.alpha)
    elif teacher_cache is not None or augmented is not None:
        raise ValueError(f"{'teacher_cache' if teacher_cache is not None else 'augmented'}: method "
                         f"{method.name!r} does not read the unlearning teacher; drop the argument")
    keep_original = retain_term is not None and "original" in retain_term.needs
    if ("reference" in method.needs or keep_original) and original is None:
        why = f"method {method.name!r} compares with it" if "reference" in method.needs else \
            "the KL retain term distils from it"
        raise ValueError(f"original: {why}; pass original= (the frozen original model)")
    if original is not None and ("reference" in method.needs or keep_original):
        original = original.to(device).eval().requires_grad_(False)
    if "reference" in method.needs:
        sequences = {}
        for epoch in range(reference_epochs):
            for example in forget:
                views = method.views(example, epoch)
                for name in method.reference_views:
                    sequences[views[name]["key"]] = views[name]
        reference = ReferenceLogProbs.build(original, sequences, pad_token_id=pad_token_id, device=device,
                                            batch_size=micro_batch_size, autocast=autocast)
    return Frozen(teacher=teacher, original=original if keep_original else None, reference=reference)
