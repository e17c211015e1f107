"""Errors a user can act on: `rklu eval` input files named with what is wrong with them, a bad RKLU_DATA_DIR named,
Ctrl-C ending with status 130 and the command that resumes, without a traceback."""
import importlib
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rklu_fast.cli import main
from rklu_fast.data.tofu import default_data_dir
from tiny_pipeline import needs_tofu, overrides

REPO = Path(__file__).resolve().parents[1]
TINY = "configs/tiny-tofu.yaml"


def error_of(capsys, argv, status=2):
    assert main(argv) == status
    return capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- rklu eval inputs
BAD_JSON = {  # file content → what the message must say about it
    "empty": (b"", "is empty"),
    "blank": (b" \n\n", "is empty"),
    "not-json": (b"eval_log.json: 3\n", "is not valid JSON (line 1, column 1"),
    "binary": (bytes(range(128, 256)), "is not a text file (byte 0 is not UTF-8)"),
    "array": (b"[1, 2]", "holds a JSON array; expected TOFU's eval_log_aggregated.json"),
    "section": (b'{"eval_log.json": 3}', "section 'eval_log.json' holds a JSON number, expected an object"),
    "indices": (b'{"eval_log.json": {"average_perturb_loss": [[0.5, 0.7]]}}',
                "'eval_log.json'/'average_perturb_loss' must map sample indices"),
}


@pytest.mark.parametrize("kind", sorted(BAD_JSON))
def test_eval_aggregate_names_the_bad_file(tmp_path, capsys, kind):
    content, what = BAD_JSON[kind]
    path = tmp_path / f"{kind}.json"
    path.write_bytes(content)
    err = error_of(capsys, ["eval", "aggregate", str(path)])
    assert err.startswith(f"rklu eval: error: model_log: {path}") and what in err, err
    assert len(err.strip().splitlines()) == 1
    official = default_data_dir("tofu_eval_logs")
    if official is not None:  # the same file as the retain model's log is named as that
        err = error_of(capsys, ["eval", "aggregate", str(official / "llama2-7b_full_wd0.01.json"),
                                "--retain", str(path)])
        assert err.startswith(f"rklu eval: error: retain_log: {path}") and what in err, err


def test_eval_aggregate_folder_and_missing_file(tmp_path, capsys):
    err = error_of(capsys, ["eval", "aggregate", str(tmp_path)])
    assert f"model_log: {tmp_path} is a folder, not a file" in err
    err = error_of(capsys, ["eval", "aggregate", str(tmp_path / "nope.json")])
    assert f"model_log: no such file {str(tmp_path / 'nope.json')!r}" in err


BAD_TOFU = {  # --data file content → what the message must say
    "number.json": ("5", "holds a JSON number; expected TOFU records"),
    "columns.json": ('{"question": 1, "answer": 2}', "holds an object whose values are not lists of one length"),
    "ints.json": ("[1, 2]", "record 0 of {path} is a JSON number, not an object"),
    "no-answer.json": ('[{"question": "q"}]', "record 0 of {path} has no text 'answer'"),
    "lines.jsonl": ('{"question": "q", "answer": "a"}\nnot json\n', "{path} line 2 is not valid JSON"),
}


@pytest.mark.parametrize("name", sorted(BAD_TOFU))
def test_eval_tofu_data_of_the_wrong_structure_is_named_before_the_model_loads(tmp_path, capsys, name):
    content, what = BAD_TOFU[name]
    path = tmp_path / name
    path.write_text(content)
    err = error_of(capsys, ["eval", "tofu", str(tmp_path / "no-model"), "--data", str(path)])
    assert what.format(path=path) in err and str(path) in err, err
    assert "'question' and 'answer'" in err  # the structure that was expected


def test_eval_tofu_data_folder_names_the_split_file(tmp_path, capsys):
    (tmp_path / "forget10_perturbed.json").write_text('{"data": [{"question": "q", "answer": 3}]}')
    err = error_of(capsys, ["eval", "tofu", str(tmp_path / "no-model"), "--data", str(tmp_path)])
    assert f"record 0 of {tmp_path / 'forget10_perturbed.json'} has no text 'answer'" in err


# ---------------------------------------------------------------------------------------------- RKLU_DATA_DIR
def test_missing_rklu_data_dir_is_an_error_naming_the_variable(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("RKLU_DATA_DIR", str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError, match=r"RKLU_DATA_DIR: no such folder '.*nope'"):
        default_data_dir("tofu")
    err = error_of(capsys, ["run", "--config", TINY, f"run_dir={tmp_path / 'run'}"])
    assert "RKLU_DATA_DIR: no such folder" in err and not (tmp_path / "run").exists()


def test_rklu_data_dir_is_the_only_place_looked(tmp_path, monkeypatch):
    (tmp_path / "tofu").mkdir()
    monkeypatch.setenv("RKLU_DATA_DIR", str(tmp_path))
    assert default_data_dir("tofu") == tmp_path / "tofu"
    assert default_data_dir("wikitext") is None  # not ../shared/data/wikitext behind the user's back


# ---------------------------------------------------------------------------------------------- Ctrl-C
def test_interrupt_in_process_names_the_resume_command(tmp_path, capsys, monkeypatch):
    from rklu_fast.train.pipeline import Run

    def interrupted(self):
        raise KeyboardInterrupt
    monkeypatch.setattr(Run, "finetune", interrupted)
    ov = overrides(tmp_path / "my run", "llama")
    err = error_of(capsys, ["run", "--config", TINY, *ov], status=130)
    line = err.strip()
    assert "Traceback" not in err and "\n" not in line
    expected = ["rklu", "run", "--config", TINY, "--resume", *ov]
    assert line.startswith("rklu: interrupted; continue with: rklu run --config")
    assert shlex.split(line.split("continue with: ", 1)[1]) == expected  # pastes back into a shell as is

    aggregate = importlib.import_module("rklu_fast.eval.aggregate")  # the module (the package exports a function)
    monkeypatch.setattr(aggregate, "aggregate", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt))
    err = error_of(capsys, ["eval", "aggregate", "x.json"], status=130)
    assert err.strip() == "rklu: interrupted"


@needs_tofu
def test_sigint_during_a_run_exits_130_with_the_resume_command(tmp_path):
    """A real Ctrl-C (SIGINT to the process) while the first stage trains."""
    ov = overrides(tmp_path / "run", "llama", **{"finetune.epochs": 500})
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, "-m", "rklu_fast.cli", "run", "--config", TINY, *ov], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    log = tmp_path / "run" / "original" / "log.jsonl"
    deadline = time.monotonic() + 240
    while not (log.is_file() and log.stat().st_size) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert proc.poll() is None, proc.communicate()[1][-2000:]
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err[-2000:]
    assert err.rstrip().splitlines()[-1].startswith("rklu: interrupted; continue with: rklu run --config "
                                                    f"{TINY} --resume run_dir=")
