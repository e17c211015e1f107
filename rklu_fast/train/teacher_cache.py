"""The teacher cache: one forward of the two frozen models over the forget set, then the models can be freed.

The teacher of RKLU is fixed while the student trains, so its inputs — the original's and the augmented model's
logits on the forget set's answer tokens — can be computed once.  The cache stores exactly the rows the online
path feeds ``reverse_kl_loss(..., teacher_rows="valid")``: for example ``i``, the rows of ``logits[:, :-1]``
whose next-token label ``labels[:, 1:]`` is not ignored, in order, in the dtype the models produced.  A batch's
teacher is then the concatenation of its examples' rows in batch order (row-major), which is what
``teacher_rows="valid"`` expects, so cached and online losses are computed from the same numbers.

Two layouts (``teacher.store``): ``pair`` keeps both models' rows (the teacher is formed in the loss: an α sweep
reuses one cache); ``combined`` keeps only the teacher ``l_t`` (α and the form baked in, formed in fp32 and
rounded once to the cache dtype): half the memory, and the loss reads 2 rows and writes 1 per position instead of
3 + 1.

Storage: host memory (``path=None``) or a directory with raw memory-mapped row files (``original.bin`` and
``augmented.bin``, or ``teacher.bin``; read lazily through ``torch.from_file``) and ``meta.json``; the directory
is written atomically and ``meta.json`` records the key (model, data and template fingerprints, dtype, vocab,
form, layout, α).  Opening a cache with a different key raises ``StaleTeacherCache`` naming every field that
differs.

Size: ``rows × vocab × itemsize`` per stored tensor; TOFU forget10 (≈ 400 answers) on Llama-2 in bf16 is a few
GB.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterable

import torch

from rklu_fast.data.collate import collate, num_targets, target_mask, to_device
from rklu_fast.train.checkpoint import atomic_directory
from rklu_fast.reference import shifted_augmented, teacher_logits
from rklu_fast.train.frozen import TeacherRows

FORMAT_VERSION = 1
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class StaleTeacherCache(ValueError):
    """A cache built for other models, data, template, dtype or vocab than the run asks for."""


def _sha(chunks: Iterable[bytes]) -> str:
    h = hashlib.sha256()
    for c in chunks:
        h.update(c)
    return h.hexdigest()[:16]


def model_fingerprint(model: torch.nn.Module, samples_per_tensor: int = 4096) -> str:
    """A cheap identity of a model's weights: names, shapes, dtypes and an evenly strided sample of each tensor.

    Reading every byte of a 7B model would take longer than the cache saves on small forget sets; fine-tuning
    changes (nearly) every element, so a strided sample of each tensor tells two fine-tunes of one base apart.
    """
    def chunks():
        for name, t in model.state_dict().items():
            flat = t.detach().reshape(-1)
            step = max(1, flat.numel() // samples_per_tensor)
            sample = flat[::step][:samples_per_tensor].to("cpu", torch.float32).contiguous()
            yield f"{name}:{tuple(t.shape)}:{t.dtype};".encode()
            yield sample.numpy().tobytes()
    return _sha(chunks())


def data_fingerprint(examples: list[dict]) -> str:
    """Identity of the tokenised forget set (ids and labels of every example, in index order): it changes with
    the data, the tokenizer, the template and ``max_length``."""
    def chunks():
        for e in examples:
            yield json.dumps([list(map(int, e["input_ids"])), list(map(int, e["labels"]))]).encode()
    return _sha(chunks())


def template_fingerprint(template) -> str:
    """Identity of a prompt template (``rklu_fast.data.Template`` or any dataclass/str)."""
    fields = asdict(template) if hasattr(template, "__dataclass_fields__") else str(template)
    return _sha([json.dumps(fields, sort_keys=True).encode()])


STORES = ("combined", "pair")


@dataclass(frozen=True)
class CacheKey:
    """What a cache was computed from; every field must match for the cache to be used."""
    original: str
    augmented: str
    data: str
    template: str
    dtype: str
    vocab_size: int
    teacher_form: str = "logits"   # the augmented rows are stored shifted by the form's c (reference.py)
    store: str = "pair"            # pair: l_o and l_aug; combined: the teacher l_t itself (α baked in)
    alpha: float | None = None     # combined only


def answer_row_counts(labels: torch.Tensor) -> torch.Tensor:
    """Per example, the number of valid teacher rows: its counted targets (``target_mask``; the op never shifts)."""
    return target_mask(labels).sum(dim=1)


def model_logits_fn(original: torch.nn.Module, augmented: torch.nn.Module, form: str = "logits") -> Callable:
    """The online teacher forward: ``batch -> (original logits, augmented logits)``, both ``[B, T, V]``; with a
    teacher ``form`` the augmented logits come shifted by its per-row ``c`` in float32 at least, as the online
    teacher passes them to the loss (a combined cache forms the teacher from them before any rounding)."""
    @torch.no_grad()
    def logits(batch: dict):
        kw = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        lo, la = original(**kw).logits, augmented(**kw).logits
        return lo, shifted_augmented(lo, la, form)
    return logits


class TeacherCache:
    """Valid answer rows of the teacher's inputs, per forget-set example.

    ``key.store == "pair"``: the original's and the augmented model's rows (the loss forms the teacher; an α sweep
    reuses one cache).  ``"combined"``: the teacher ``l_t = l_o − α·relu(l_aug − c − l_o)`` itself, formed in fp32
    from the models' rows and rounded once to the cache dtype: half the memory, and the loss reads two rows per
    position instead of three (``reverse_kl_loss(..., augmented_logits=None)``).  ``rows(indices)`` returns a
    batch's rows in the order ``teacher_rows="valid"`` expects: ``(original, augmented)`` or ``(teacher, None)``.
    """

    def __init__(self, stores: list[torch.Tensor], offsets: torch.Tensor, key: CacheKey):
        if len(stores) != (1 if key.store == "combined" else 2):
            raise ValueError(f"stores: {len(stores)} for a {key.store!r} cache")
        self.stores, self.offsets, self.key = stores, offsets, key

    @property
    def original(self) -> torch.Tensor:
        """The original's rows (pair), or the teacher's (combined)."""
        return self.stores[0]

    @property
    def augmented(self) -> torch.Tensor | None:
        return self.stores[1] if len(self.stores) == 2 else None

    @property
    def num_examples(self) -> int:
        return len(self.offsets) - 1

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.stores)

    @staticmethod
    def files(key: CacheKey) -> tuple[str, ...]:
        return ("teacher.bin",) if key.store == "combined" else ("original.bin", "augmented.bin")

    @classmethod
    def build(cls, logits_fn: Callable, batches: Iterable[dict], num_examples: int, key: CacheKey,
              path: str | Path | None = None, row_counts: torch.Tensor | None = None) -> "TeacherCache":
        """One pass of ``logits_fn`` (e.g. ``model_logits_fn(original, augmented)`` or the online teacher's
        forward) over ``batches``; each batch holds ``index`` (example ids), ``input_ids``, ``attention_mask``,
        ``labels``.  ``row_counts`` (per example, e.g. from ``answer_row_counts``) sizes the storage up front so
        rows stream straight into the file; without it they are counted from the batches first.
        """
        if key.store not in STORES:
            raise ValueError(f"teacher.store: must be one of {STORES}, got {key.store!r}")
        if (key.store == "combined") != (key.alpha is not None):
            raise ValueError("CacheKey: alpha is set exactly for combined caches (it is baked into the teacher)")
        batches = list(batches) if row_counts is None else batches
        if row_counts is None:
            row_counts = torch.zeros(num_examples, dtype=torch.long)
            for b in batches:
                row_counts[b["index"]] = answer_row_counts(b["labels"]).cpu()
        if len(row_counts) != num_examples:
            raise ValueError(f"row_counts: {len(row_counts)} entries for num_examples={num_examples}")
        offsets = torch.zeros(num_examples + 1, dtype=torch.long)
        offsets[1:] = torch.cumsum(row_counts, 0)
        shape, dtype = (int(offsets[-1]), key.vocab_size), _DTYPES[key.dtype]

        def fill(stores: list[torch.Tensor]) -> None:
            seen = torch.zeros(num_examples, dtype=torch.bool)
            for batch in batches:
                orig, aug = logits_fn(batch)
                # a form's shifted augmented rows may come in float32 (rounded to the cache dtype when stored)
                shifted_ok = {dtype, torch.promote_types(dtype, torch.float32)} if key.teacher_form != "logits" \
                    else {dtype}
                for name, t, ok in (("original", orig, {dtype}), ("augmented", aug, shifted_ok)):
                    if t.dtype not in ok or t.shape[-1] != key.vocab_size:
                        raise ValueError(f"{name} logits: {t.dtype} [..., {t.shape[-1]}] but the cache key says "
                                         f"{key.dtype} [..., {key.vocab_size}]")
                valid = target_mask(batch["labels"]).to(orig.device)
                for j, i in enumerate(batch["index"].tolist()):
                    lo, hi = int(offsets[i]), int(offsets[i + 1])
                    if int(valid[j].sum()) != hi - lo:
                        raise ValueError(f"batch: example {i} has {int(valid[j].sum())} answer rows, "
                                         f"row_counts says {hi - lo}")
                    o, a = orig[j, :-1][valid[j]], aug[j, :-1][valid[j]]
                    if key.store == "combined":  # formed in fp32, rounded once to the cache dtype
                        stores[0][lo:hi] = teacher_logits(o, a, key.alpha).to(dtype).cpu()
                    else:
                        stores[0][lo:hi], stores[1][lo:hi] = o.cpu(), a.cpu()
                    seen[i] = True
            if not bool(seen.all()):
                missing = (~seen).nonzero().flatten()[:10].tolist()
                raise ValueError(f"batches: examples {missing}... never appeared; the cache needs every example")

        if path is None:
            stores = [torch.empty(shape, dtype=dtype) for _ in cls.files(key)]
            fill(stores)
            return cls(stores, offsets, key)
        n = shape[0] * shape[1]
        with atomic_directory(path) as tmp:
            stores = [torch.from_file(str(tmp / f), shared=True, size=n, dtype=dtype).view(shape)
                      for f in cls.files(key)]
            fill(stores)
            del stores  # unmap (flushes the pages) before the directory is fsynced and renamed
            meta = {"format": FORMAT_VERSION, "key": asdict(key), "rows": shape[0], "offsets": offsets.tolist()}
            (tmp / "meta.json").write_text(json.dumps(meta))
        return cls.load(path, key)

    @classmethod
    def load(cls, path: str | Path, expected: CacheKey | None = None) -> "TeacherCache":
        """Memory-map a cache directory; with ``expected``, refuse it unless its key matches field by field."""
        path = Path(path)
        if not (path / "meta.json").is_file():
            raise FileNotFoundError(f"teacher cache: no {path / 'meta.json'} (not a finished cache directory)")
        meta = json.loads((path / "meta.json").read_text())
        if meta.get("format") != FORMAT_VERSION:
            raise StaleTeacherCache(f"teacher cache {path}: format {meta.get('format')}, this version reads "
                                    f"{FORMAT_VERSION}; delete it to rebuild")
        key = CacheKey(**meta["key"])  # fields added since default to what older caches were
        if expected is not None and key != expected:
            diffs = [f"{f}: cache has {getattr(key, f)!r}, run needs {getattr(expected, f)!r}"
                     for f in expected.__dataclass_fields__ if getattr(key, f) != getattr(expected, f)]
            raise StaleTeacherCache(f"teacher cache {path} was built for something else — " + "; ".join(diffs)
                                    + ". Delete the directory (or point the run at a new one) to rebuild it.")
        shape, dtype = (meta["rows"], key.vocab_size), _DTYPES[key.dtype]
        n = shape[0] * shape[1]
        stores = [torch.from_file(str(path / f), shared=False, size=n, dtype=dtype).view(shape)
                  for f in cls.files(key)]
        return cls(stores, torch.tensor(meta["offsets"], dtype=torch.long), key)

    def to(self, device: torch.device | str) -> "TeacherCache":
        """The same cache with its rows on ``device`` (e.g. the GPU when it fits: no host copy per step)."""
        return TeacherCache([t.to(device) for t in self.stores], self.offsets, self.key)

    def rows(self, indices: torch.Tensor | list[int], device: torch.device | str | None = None
             ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Teacher rows ``(original, augmented)`` (pair) or ``(teacher, None)`` (combined) of a batch of examples,
        concatenated in batch order."""
        idx = torch.as_tensor(indices, dtype=torch.long).tolist()
        if any(i < 0 or i >= self.num_examples for i in idx):
            raise ValueError(f"indices: must lie in [0, {self.num_examples}), got {idx}")
        spans = [(int(self.offsets[i]), int(self.offsets[i + 1])) for i in idx]
        out = []
        for store in self.stores:
            t = torch.cat([store[lo:hi] for lo, hi in spans])
            out.append(t if device is None else t.to(device, non_blocking=True))
        return out[0], (out[1] if len(out) == 2 else None)


def build_forget_cache(logits_fn: Callable, examples: list[dict], key: CacheKey, *, pad_token_id: int,
                       micro_batch_size: int = 8, device: torch.device | str = "cpu",
                       path: str | Path | None = None) -> TeacherCache:
    """The cache of a tokenised forget set (``encode_qa``/``chunk_text`` outputs, in index order), forwarded in
    micro-batches of consecutive examples."""
    counts = torch.tensor([num_targets(e) for e in examples])

    def batches():
        for start in range(0, len(examples), micro_batch_size):
            chunk = examples[start:start + micro_batch_size]
            batch = to_device(collate(chunk, pad_token_id), device)
            batch["index"] = torch.arange(start, start + len(chunk))
            yield batch
    return TeacherCache.build(logits_fn, batches(), len(examples), key, path=path, row_counts=counts)


class CachedTeacher:
    """A teacher source (the interface of ``teacher.OnlineTeacher``) that reads a ``TeacherCache``.

    ``rows(batch)`` returns the compact valid rows of the batch's examples (``rows="valid"``), found by the batch's
    ``index`` (``collate`` keeps each example's position in the forget set): no lookup by content, no host copy.
    """

    def __init__(self, cache: TeacherCache, examples: list[dict]):
        if len(examples) != cache.num_examples:
            raise ValueError(f"examples: {len(examples)} given, the cache holds {cache.num_examples}")
        self.cache = cache

    def rows(self, batch: dict) -> TeacherRows:
        if "index" not in batch:
            raise ValueError("batch: has no 'index' (collate keeps it when every example has one); the cached "
                             "teacher finds its rows by example index")
        original, augmented = self.cache.rows(batch["index"], device=batch["input_ids"].device)
        return TeacherRows(original, augmented, "valid")


def place_cache(cache: TeacherCache, device) -> TeacherCache:
    """On a GPU, the cache moves to device memory when it takes at most a quarter of what is free: a host cache
    costs a gather and a pageable host-to-device copy of every micro-batch's rows, enough to make cached steps
    slower than online ones (docs/memory-and-scale.md)."""
    if torch.device(device).type == "cuda" and cache.nbytes() <= torch.cuda.mem_get_info(device)[0] // 4:
        return cache.to(device)
    return cache


TEACHER_MODES = ("auto", "online", "cached")


def _available_host_bytes() -> int:
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def make_teacher(mode: str, original: torch.nn.Module, augmented: torch.nn.Module, examples: list[dict], *,
                 template, pad_token_id: int, device, cache_dir: str | Path | None = None,
                 micro_batch_size: int = 8, autocast=contextlib.nullcontext, form: str = "logits",
                 store: str = "pair", alpha: float | None = None):
    """The unlearn stage's teacher source (config ``teacher.mode``).

    ``online``: ``OnlineTeacher`` (both models on ``device``).  ``cached``: build (or, with ``cache_dir``, load
    and check) the cache; the source then holds neither model (the caller may free them); on a GPU the cache
    moves to device memory when it takes at most a quarter of what is free.  ``auto``: cached when the cache
    (one per process of the machine) fits in half the free host memory or ``cache_dir`` is given, else online.
    The cache is built under ``autocast`` (the training loop's ``accelerator.autocast``), so it holds the logits,
    in the dtype, that the online path would compute.
    """
    from rklu_fast.train.teacher import OnlineTeacher

    if mode not in TEACHER_MODES:
        raise ValueError(f"teacher.mode: must be one of {TEACHER_MODES}, got {mode!r}")
    original, augmented = original.to(device).eval(), augmented.to(device).eval()
    logits_fn = model_logits_fn(original, augmented, form)

    def under_autocast(batch):
        with autocast():
            return logits_fn(batch)
    probe = to_device(collate(examples[:1], pad_token_id), device)
    dtype = under_autocast(probe)[0].dtype
    vocab = original.config.vocab_size
    rows = sum(num_targets(e) for e in examples)
    nbytes = (1 if store == "combined" else 2) * rows * vocab * dtype.itemsize
    if mode == "auto":
        # without cache_dir every process of this machine holds its own copy (with it, they map one file)
        copies = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        mode = "cached" if cache_dir is not None or copies * nbytes <= _available_host_bytes() // 2 else "online"
    if mode == "online":
        return OnlineTeacher(original, augmented, form)
    key = CacheKey(original=model_fingerprint(original), augmented=model_fingerprint(augmented),
                   data=data_fingerprint(examples), template=template_fingerprint(template),
                   dtype=str(dtype).removeprefix("torch."), vocab_size=vocab, teacher_form=form, store=store,
                   alpha=float(alpha) if store == "combined" else None)
    if cache_dir is not None and (Path(cache_dir) / "meta.json").is_file():
        cache = TeacherCache.load(cache_dir, key)  # refuses a stale cache, naming what differs
    else:
        cache = build_forget_cache(under_autocast, examples, key, pad_token_id=pad_token_id,
                                   micro_batch_size=micro_batch_size, device=device, path=cache_dir)
    return CachedTeacher(place_cache(cache, device), examples)
