"""What a run says: `logging` under the 'distill' logger, on the console and in a log file per run.

Progress goes through `log(stage, msg)` (INFO), printed as `[stage] msg` on standard output, as the
stages always printed it. By default INFO and above reach the console; `--quiet` keeps warnings and
errors only, `--verbose` adds DEBUG and the third-party libraries' own logs (Ray, transformers, vLLM),
which otherwise stay at WARNING (vLLM inside its actor at ERROR).

`run_log(out_dir, command)` (the CLI, for every stage that writes) adds `<out_dir>/logs/<time>-<command>.log`:
every record at DEBUG with its time, plus whatever else reaches the driver's standard output and error
(the Ray workers' lines, which Ray prints there), so a run's file holds the whole story even under
`--quiet`.

`progress(stage, total, unit)` draws a tqdm bar for a driver-side loop on the console itself, past the
run's tee, so the log file never sees its carriage returns. It draws only when the console is a terminal,
not under `--quiet`, and never in a Ray worker (whose standard output is a file Ray forwards line by line);
`DISTILL_PROGRESS=1` draws it on any console, `=0` never. While a bar is up, the caller's per-step lines
go at `progress.line_level` (DEBUG: the file keeps them, the bar replaces them on the console); without a
bar they stay INFO lines, as before.
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
PROGRESS_ENV = "DISTILL_PROGRESS"
"""1 (or true/yes/on): progress bars on any console; 0 (false/no/off): never; unset: on a terminal."""
THIRD_PARTY = ("ray", "transformers", "vllm", "urllib3", "filelock", "huggingface_hub")
"""Loggers of the libraries a run uses: WARNING on the console unless --verbose."""


_BARS: list = []
"""The progress bars drawn now (tqdm instances), innermost last."""


@contextlib.contextmanager
def _above_bars() -> Iterator[None]:
    """Console output in here is written above the bars: they are cleared first and drawn again after."""
    if not _BARS:
        yield
        return
    from tqdm import tqdm

    with tqdm.get_lock():
        bars = list(_BARS)
        for bar in bars:
            bar.clear(nolock=True)
        try:
            yield
        finally:
            for bar in bars:
                bar.refresh(nolock=True)


class _Tee(io.TextIOBase):
    """A stream that writes to the console (unless hidden) and to the run's log file. While a progress
    bar is up, the console gets whole lines only, written above the bar."""

    def __init__(self, console, file, show: bool) -> None:
        self.console, self.file, self.show = console, file, show
        self.pending = ""

    def write(self, s: str) -> int:
        if self.show:
            if _BARS or self.pending:
                self.pending += s
                lines, nl, self.pending = self.pending.rpartition("\n")
                if nl:
                    with _above_bars():
                        self.console.write(lines + nl)
                        self.console.flush()
                if not _BARS:
                    self._release()
            else:
                self.console.write(s)
        if not self.file.closed:  # a library may keep this stream past the run (colorama's reset at exit)
            self.file.write(s)
        return len(s)

    def _release(self) -> None:
        """The part of a line held back while a bar was up, once none is."""
        if self.pending and not _BARS:
            self.console.write(self.pending)
            self.pending = ""

    def flush(self) -> None:
        self._release()
        self.console.flush()
        if not self.file.closed:
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
            with _above_bars():
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


def verbose() -> bool:
    """Whether the console shows everything (`--verbose`): then third-party logs are shown too."""
    return CONSOLE.level <= logging.DEBUG


def set_console(*, quiet: bool = False, verbose: bool = False) -> None:
    """The console's level: warnings only (`quiet`), everything with third-party logs (`verbose`), or INFO."""
    CONSOLE.setLevel(logging.WARNING if quiet else logging.DEBUG if verbose else logging.INFO)
    for name in THIRD_PARTY:
        logging.getLogger(name).setLevel(logging.INFO if verbose else logging.WARNING)
    if verbose:
        os.environ["VLLM_LOGGING_LEVEL"] = "INFO"  # read by the vLLM actor (cluster.runtime passes it on)


def progress_shown(stream=None) -> bool:
    """Whether `progress` draws a bar: not in a Ray worker, not under --quiet, then DISTILL_PROGRESS
    if set, else whether `stream` (the console) is a terminal."""
    if "RAY_RAYLET_PID" in os.environ:  # set by the raylet in every worker it starts, never in the driver
        return False
    if CONSOLE.level > logging.INFO:
        return False
    forced = os.environ.get(PROGRESS_ENV, "").strip().lower()
    if forced in ("1", "true", "yes", "on"):
        return True
    if forced in ("0", "false", "no", "off"):
        return False
    stream = _console_stream() if stream is None else stream
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError, OSError):  # no isatty, or a closed stream
        return False


class Progress:
    """What `progress` yields: `update(n, **postfix)` advances the bar, if one is drawn, and shows
    `postfix` (say rows/s) beside it; `line_level` is the level for the caller's own per-step lines."""

    def __init__(self, bar) -> None:
        self.bar = bar

    @property
    def shown(self) -> bool:
        return self.bar is not None

    @property
    def line_level(self) -> int:
        return logging.DEBUG if self.bar is not None else logging.INFO

    def update(self, n: int = 1, **postfix: object) -> None:
        if self.bar is None:
            return
        if postfix:
            self.bar.set_postfix(postfix, refresh=False)
        self.bar.update(n)


def _size(stream) -> tuple[int, int] | None:
    """None when the terminal reports its size (tqdm follows it), else (80, 24)."""
    try:
        got = os.get_terminal_size(stream.fileno())
        return None if got.columns > 0 and got.lines > 0 else (80, 24)
    except (AttributeError, ValueError, OSError):
        return (80, 24)


@contextlib.contextmanager
def progress(stage: str, total: int, unit: str = "it") -> Iterator[Progress]:
    """A progress bar `[stage]` over `total` units on the console, or nothing (see `progress_shown`).
    For driver-side loops: a Ray worker's bar could not reach the driver's console."""
    stream = _console_stream()
    if total <= 0 or not progress_shown(stream):  # nothing to count: no bar
        yield Progress(None)
        return
    from tqdm import tqdm

    # TQDM_DISABLE and the other TQDM_* variables still apply: only what is passed here is fixed.
    size = _size(stream)  # a terminal that reports no size (0 x 0) gets 80 x 24, not an empty bar
    bar = tqdm(total=total, desc=f"[{stage}]", unit=unit, file=stream, leave=False, dynamic_ncols=size is None,
               ncols=size and size[0], nrows=size and size[1], mininterval=0.5)
    if bar.disable:  # TQDM_DISABLE=1 in the environment tqdm was imported in: no bar, so the lines stay
        bar.close()
        yield Progress(None)
        return
    with tqdm.get_lock():
        _BARS.append(bar)
    try:
        yield Progress(bar)
    finally:
        with tqdm.get_lock():
            _BARS.remove(bar)
        bar.close()
        for tee in (sys.stdout, sys.stderr):
            if isinstance(tee, _Tee):
                tee._release()


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
