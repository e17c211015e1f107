"""TOFU loading from a local folder of JSON Lines, one JSON/JSONL file, or a hub id (``locuslab/TOFU``)."""
from __future__ import annotations

import json
import os
from pathlib import Path

TOFU_SPLITS = (
    "full", "forget01", "forget05", "forget10", "retain90", "retain95", "retain99",
    "forget01_perturbed", "forget05_perturbed", "forget10_perturbed", "retain_perturbed",
    "real_authors", "real_authors_perturbed", "world_facts", "world_facts_perturbed",
    "holdout01", "holdout05", "holdout10",
)
HUB_ID = "locuslab/TOFU"


def default_data_dir(name: str = "tofu") -> Path | None:
    """``$RKLU_DATA_DIR/<name>`` when the variable is set (then the only place looked: a folder that does not exist
    is an error naming the variable, not a silent fall-back), else ``../shared/data/<name>`` beside the repo or
    the working directory; ``None`` when there is no such folder."""
    given = os.environ.get("RKLU_DATA_DIR")
    if given:
        if not Path(given).is_dir():
            raise FileNotFoundError(f"RKLU_DATA_DIR: no such folder {given!r} (it should hold tofu/, wikitext/ …); "
                                    "fix the variable or unset it to use ../shared/data")
        return Path(given) / name if (Path(given) / name).is_dir() else None
    repo = Path(__file__).resolve().parents[2]
    for c in (repo.parent / "shared" / "data" / name, Path.cwd().parent / "shared" / "data" / name,
              Path.cwd() / "shared" / "data" / name):
        if c.is_dir():
            return c
    return None


_EXPECTED = ("TOFU records: JSON Lines of objects with 'question' and 'answer', or a JSON list of such objects, "
             "{'data': [...]}, or columns {'question': [...], 'answer': [...]}")


def json_type(value) -> str:
    """The JSON name of a parsed value's type, for error messages."""
    return {dict: "object", list: "array", str: "string", int: "number", float: "number", bool: "boolean",
            type(None): "null"}.get(type(value), type(value).__name__)


def read_text_file(path: str | os.PathLike, what: str) -> str:
    """The UTF-8 text of a file; a folder, a missing, empty or binary file is an error naming ``what`` (the
    argument or key it was given as) and the file (``FileNotFoundError`` when missing, else ``ValueError``)."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{what}: {path} is a folder, not a file")
    if not path.is_file():
        raise FileNotFoundError(f"{what}: no such file {str(path)!r}")
    raw = path.read_bytes()
    if not raw.strip():
        raise ValueError(f"{what}: {path} is empty")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{what}: {path} is not a text file (byte {e.start} is not UTF-8)") from None


def read_json_file(path: str | os.PathLike, what: str) -> object:
    """The parsed content of a JSON file, with ``read_text_file``'s errors and malformed JSON named the same way."""
    text = read_text_file(path, what)
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{what}: {path} is not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})") from None


def _read_json_records(path: Path) -> list[dict]:
    if path.suffix == ".jsonl":
        records = []
        for n, line in enumerate(read_text_file(path, "source").splitlines(), 1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"source: {path} line {n} is not valid JSON ({e.msg}); expected "
                                     f"{_EXPECTED}") from None
        return records
    data = read_json_file(path, "source")
    if isinstance(data, dict):  # {"data": [...]} or column-major {"question": [...], "answer": [...]}
        if "data" in data and isinstance(data["data"], list):
            return data["data"]
        if data and all(isinstance(v, list) for v in data.values()) and len({len(v) for v in data.values()}) == 1:
            keys = list(data)
            return [dict(zip(keys, vals)) for vals in zip(*(data[k] for k in keys))]
    if isinstance(data, list):
        return data
    shape = f"an object whose values are not lists of one length (keys: {sorted(data)[:6]})" \
        if isinstance(data, dict) else f"a JSON {json_type(data)}"
    raise ValueError(f"source: {path} holds {shape}; expected {_EXPECTED}")


def load_tofu(split: str, source: str | os.PathLike | None = None) -> list[dict]:
    """Records (dicts with ``question``, ``answer`` and, for ``*_perturbed``, ``paraphrased_answer`` and
    ``perturbed_answer``) of one TOFU split.

    ``source``: a folder holding ``<split>.jsonl``/``<split>.json``, a single JSON/JSONL file (``split`` is then
    only a label), the hub id ``locuslab/TOFU`` (through ``datasets``), or ``None`` for the local default
    (``../shared/data/tofu``), falling back to the hub.
    """
    if source is None:
        source = default_data_dir("tofu") or HUB_ID
    path = origin = Path(source)
    if path.is_file():
        records = _read_json_records(path)
    elif path.is_dir():
        for suffix in (".jsonl", ".json"):
            if (path / f"{split}{suffix}").is_file():
                origin = path / f"{split}{suffix}"
                records = _read_json_records(origin)
                break
        else:
            have = sorted(p.stem for p in path.glob("*.json*"))
            raise FileNotFoundError(f"split: no {split}.jsonl or {split}.json in {path} (found: {have})")
    elif str(source).count("/") == 1 and not str(source).startswith((".", "/")):
        import datasets  # hub id: the real loading path for users with network access

        records = list(datasets.load_dataset(str(source), split, split="train"))
    else:
        raise FileNotFoundError(f"source: {source!r} is neither a file, a folder nor a hub id like {HUB_ID!r}")
    if not records:
        raise ValueError(f"split: {split!r} from {origin} is empty")
    for i, r in enumerate(records):
        if not isinstance(r, dict):
            raise ValueError(f"source: record {i} of {origin} is a JSON {json_type(r)}, not an object; expected "
                             f"{_EXPECTED}")
        missing = [k for k in ("question", "answer") if not isinstance(r.get(k), str)]
        if missing:
            raise ValueError(f"source: record {i} of {origin} has no text {' or '.join(map(repr, missing))}; "
                             f"expected {_EXPECTED}")
    return records
