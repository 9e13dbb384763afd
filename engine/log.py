"""What a run says: `logging` under the 'distill' logger, on the console and in a log file per run.

Progress goes through `log(stage, msg)` (INFO), printed as `[stage] msg` on standard output, as the
stages always printed it. By default INFO and above reach the console; `--quiet` keeps warnings and
errors only, `--verbose` adds DEBUG and the third-party libraries' own logs (Ray, transformers, vLLM),
which otherwise stay at WARNING (vLLM inside its actor at ERROR).

`run_log(out_dir, command)` (the CLI, for every stage that writes) adds `<out_dir>/logs/<time>-<command>.log`:
every record at DEBUG with its time, plus whatever else reaches the driver's standard output and error
(the Ray workers' lines, which Ray prints there), so a run's file holds the whole story even under
`--quiet`.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import sys
import time
import traceback
from collections.abc import Iterator
from pathlib import Path

LOGGER = logging.getLogger("distill")
WARNING = logging.WARNING
THIRD_PARTY = ("ray", "transformers", "vllm", "urllib3", "filelock", "huggingface_hub")
"""Loggers of the libraries a run uses: WARNING on the console unless --verbose."""


class _Tee(io.TextIOBase):
    """A stream that writes to the console (unless hidden) and to the run's log file."""

    def __init__(self, console, file, show: bool) -> None:
        self.console, self.file, self.show = console, file, show

    def write(self, s: str) -> int:
        if self.show:
            self.console.write(s)
        self.file.write(s)
        return len(s)

    def flush(self) -> None:
        self.console.flush()
        self.file.flush()

    def fileno(self) -> int:
        return self.console.fileno()

    def isatty(self) -> bool:
        return self.console.isatty()


def _console_stream():
    """Standard output as it is now (pytest's capture, say), past the run's tee: a record reaches the log
    file through its own handler, not twice."""
    out = sys.stdout
    return out.console if isinstance(out, _Tee) else out


class _Console(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        try:
            stream = _console_stream()
            stream.write(self.format(record) + "\n")
            stream.flush()
        except Exception:  # noqa: BLE001 - logging's own contract: report, never raise
            self.handleError(record)


CONSOLE = _Console(logging.INFO)
CONSOLE.setFormatter(logging.Formatter("%(message)s"))
if not any(isinstance(h, _Console) for h in LOGGER.handlers):
    LOGGER.addHandler(CONSOLE)
LOGGER.setLevel(logging.DEBUG)
LOGGER.propagate = False


def log(stage: str, msg: str, level: int = logging.INFO) -> None:
    """One progress line, `[stage] msg`."""
    LOGGER.log(level, "[%s] %s", stage, msg)


def set_console(*, quiet: bool = False, verbose: bool = False) -> None:
    """The console's level: warnings only (`quiet`), everything with third-party logs (`verbose`), or INFO."""
    CONSOLE.setLevel(logging.WARNING if quiet else logging.DEBUG if verbose else logging.INFO)
    for name in THIRD_PARTY:
        logging.getLogger(name).setLevel(logging.INFO if verbose else logging.WARNING)
    if verbose:
        os.environ["VLLM_LOGGING_LEVEL"] = "INFO"  # read by the vLLM actor (cluster.runtime passes it on)


@contextlib.contextmanager
def run_log(out_dir: str | Path, command: str, *, quiet: bool = False) -> Iterator[Path]:
    """While open: every 'distill' record, and everything on standard output and error, also goes to a
    new file `<out_dir>/logs/<UTC time>-<command>-<pid>.log` (never an existing one). `quiet` hides
    standard output's other lines (the workers' progress) from the console; they still reach the file."""
    folder = Path(out_dir) / "logs"
    folder.mkdir(parents=True, exist_ok=True)
    stem = f"{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}-{command}-{os.getpid()}"
    for n in range(1000):
        path = folder / (f"{stem}.log" if n == 0 else f"{stem}.{n}.log")
        try:
            file = open(path, "x", buffering=1, encoding="utf-8")  # noqa: SIM115 - closed below
            break
        except FileExistsError:
            continue
    else:
        raise FileExistsError(f"{folder}: no free name for {stem}.log")
    handler = logging.StreamHandler(file)
    handler.setLevel(logging.DEBUG)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    LOGGER.addHandler(handler)
    stdout, stderr = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = _Tee(stdout, file, show=not quiet), _Tee(stderr, file, show=True)
    try:
        yield path
    except BaseException as stop:  # how the run ended goes in its file, whatever the console shows
        file.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} STOPPED {type(stop).__name__}: {stop}\n"
                   f"{''.join(traceback.format_exception(stop))}")
        raise
    finally:
        sys.stdout, sys.stderr = stdout, stderr
        LOGGER.removeHandler(handler)
        file.close()
