"""Progress output: a tqdm bar on a terminal, plain lines (no carriage returns) in logs and pipes."""
import io
import os
import pty

from tqdm import tqdm

from rklu_fast import progress as progress_module
from rklu_fast.progress import LineProgress, progress


def _drive(bar, steps):
    """As the training loop does: the step's values, then the step."""
    for i in range(steps):
        bar.set_postfix(loss=f"{i / 10:.4f}")
        bar.update(1)
    bar.close()


def test_not_a_terminal_gives_one_plain_line_per_tenth():
    out = io.StringIO()
    bar = progress(total=40, desc="unlearned", unit="step", stream=out)
    assert isinstance(bar, LineProgress)
    _drive(bar, 40)
    text = out.getvalue()
    assert "\r" not in text
    lines = text.splitlines()
    assert len(lines) == 10  # at 4, 8, …, 40 of 40 steps
    # each line shows the step it reports and that step's values
    for k, line in enumerate(lines, 1):
        assert line.startswith(f"unlearned: {4 * k}/40 steps ({10 * k}%)"), line
        assert line.endswith(f"loss={(4 * k - 1) / 10:.4f}"), line


def test_resumed_bar_counts_from_initial_and_prints_the_last_step():
    out = io.StringIO()
    bar = progress(total=7, initial=3, desc="x", unit="step", stream=out, every_percent=50)
    _drive(bar, 4)
    lines = out.getvalue().splitlines()
    assert [line.split(",")[0] for line in lines] == ["x: 4/7 steps (57%)", "x: 7/7 steps (100%)"]


def test_a_line_every_few_seconds_between_percent_marks(monkeypatch):
    clock = [0.0]
    monkeypatch.setattr(progress_module.time, "monotonic", lambda: clock[0])
    out = io.StringIO()
    bar = progress(total=1000, desc="x", unit="step", stream=out, every_percent=50, every_seconds=30)
    for _ in range(5):
        clock[0] += 20.0  # 20 s per step: a line every second step (≥ 30 s), none for the percent marks yet
        bar.set_postfix(loss=1)
        bar.update(1)
    assert [line.split(" ")[1] for line in out.getvalue().splitlines()] == ["2/1000", "4/1000"]
    assert "ETA" in out.getvalue() and "20 s/step" in out.getvalue()


def test_without_postfix_and_disabled():
    out = io.StringIO()
    bar = progress(total=3, desc="x", unit="step", stream=out)
    for _ in range(3):
        bar.update(1)
    bar.close()
    assert out.getvalue().splitlines()[-1].startswith("x: 3/3 steps (100%)")
    quiet = io.StringIO()
    _drive(progress(total=3, desc="x", stream=quiet, disable=True), 3)
    assert quiet.getvalue() == ""


def test_a_terminal_gets_the_tqdm_bar():
    master, slave = pty.openpty()
    try:
        with os.fdopen(slave, "w") as tty:
            bar = progress(total=3, desc="x", unit="step", stream=tty)
            assert isinstance(bar, tqdm)
            _drive(bar, 3)
            tty.flush()
            assert b"\r" in os.read(master, 10000)  # the redrawn bar
    finally:
        os.close(master)
