"""The console and the run's log file (engine.log): levels, --quiet, and a file that keeps everything."""

import logging
import sys

import pytest

from engine.log import LOGGER, log, run_log, set_console


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
