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
    """``$RKLU_DATA_DIR/<name>``, else ``../shared/data/<name>`` beside the repo or the working directory."""
    candidates = []
    if os.environ.get("RKLU_DATA_DIR"):
        candidates.append(Path(os.environ["RKLU_DATA_DIR"]) / name)
    repo = Path(__file__).resolve().parents[2]
    candidates += [repo.parent / "shared" / "data" / name, Path.cwd().parent / "shared" / "data" / name,
                   Path.cwd() / "shared" / "data" / name]
    for c in candidates:
        if c.is_dir():
            return c
    return None


def _read_json_records(path: Path) -> list[dict]:
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        return [json.loads(line) for line in text.splitlines() if line.strip()]
    data = json.loads(text)
    if isinstance(data, dict):  # {"data": [...]} or column-major {"question": [...], "answer": [...]}
        if "data" in data and isinstance(data["data"], list):
            return data["data"]
        keys = list(data)
        return [dict(zip(keys, vals)) for vals in zip(*(data[k] for k in keys))]
    return list(data)


def load_tofu(split: str, source: str | os.PathLike | None = None) -> list[dict]:
    """Records (dicts with ``question``, ``answer`` and, for ``*_perturbed``, ``paraphrased_answer`` and
    ``perturbed_answer``) of one TOFU split.

    ``source``: a folder holding ``<split>.jsonl``/``<split>.json``, a single JSON/JSONL file (``split`` is then
    only a label), the hub id ``locuslab/TOFU`` (through ``datasets``), or ``None`` for the local default
    (``../shared/data/tofu``), falling back to the hub.
    """
    if source is None:
        source = default_data_dir("tofu") or HUB_ID
    path = Path(source)
    if path.is_file():
        records = _read_json_records(path)
    elif path.is_dir():
        for suffix in (".jsonl", ".json"):
            if (path / f"{split}{suffix}").is_file():
                records = _read_json_records(path / f"{split}{suffix}")
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
        raise ValueError(f"split: {split!r} from {source} is empty")
    missing = [k for k in ("question", "answer") if k not in records[0]]
    if missing:
        raise ValueError(f"split: records of {split!r} from {source} lack {missing}")
    return records
