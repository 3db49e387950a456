"""One progress library for every long step (rich): statistics, template sampling, target optimisation, MEND
factors, sweep trials; Lightning's own stages use ``RichProgressBar`` (:func:`massedit.trainer.build_trainer`).

    bar = progress_bar(total, "memit z", unit="req")
    bar.update(1, loss=0.42)          # advance and/or show fields (loss, requests done, ...)
    bar.close()

Nested bars work (rich >= 14 stacks live displays, e.g. a z bar inside Lightning's test bar). A nested display has
no refresh thread of its own (and Lightning's bar refreshes only at its own batch ends), so a nested bar redraws the
stack itself, at most 5 times a second. Every ``MASSEDIT_PROGRESS_LOG_S`` seconds (default 60; 0: never) a bar also
logs one line (count, rate, elapsed, ETA, fields) to ``massedit.progress``: that is what a job without a terminal
(a batch system's log, ``run.log``) shows of a long stage. Disabled bars (``enabled=False``, or
``MASSEDIT_PROGRESS=0``) cost nothing.
"""
from __future__ import annotations

import logging
import os
import time
from typing import Any

log = logging.getLogger("massedit.progress")


def format_duration(seconds: float) -> str:
    """``1:02:03`` / ``2:03`` (hours only when needed)."""
    s = int(round(max(0.0, seconds)))
    h, m, s = s // 3600, s // 60 % 60, s % 60
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def progress_line(desc: str, n: int, total: int | None, unit: str, elapsed: float, initial: int = 0,
                  info: str = "") -> str:
    """``memit z: 230/10000 req (2.3 %), 0.52 req/s, elapsed 7:21, eta 5:13:02`` (rate and ETA over the work done
    in this process, i.e. not counting ``initial``, e.g. requests found in a cache)."""
    done = n - initial
    rate = done / elapsed if elapsed > 0 else 0.0
    parts = [f"{desc}: {n}/{total} {unit}" + (f" ({100.0 * n / total:.1f} %)" if total else "") if total is not None
             else f"{desc}: {n} {unit}", f"{rate:.3g} {unit}/s", f"elapsed {format_duration(elapsed)}"]
    if total is not None and rate > 0:
        parts.append(f"eta {format_duration((total - n) / rate)}")
    return ", ".join(parts) + (f"  {info}" if info else "")


class ProgressBar:
    """A rich progress bar with a count, rate, elapsed / remaining time and free-form fields."""

    def __init__(self, total: int | None, desc: str, unit: str = "it", enabled: bool = True, initial: int = 0,
                 transient: bool = False):
        self.total, self.desc, self.unit = total, desc, unit
        self.n = int(initial)
        self.fields: dict[str, Any] = {}
        self.t0 = time.time()
        self.initial = int(initial)
        self._progress = self._task = None
        self._last_draw = 0.0
        try:
            self._log_every = float(os.environ.get("MASSEDIT_PROGRESS_LOG_S", "60"))
        except ValueError:
            self._log_every = 60.0
        self._next_log = self.t0 + self._log_every
        if enabled and os.environ.get("MASSEDIT_PROGRESS", "1") not in ("0", "false", "no"):
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                                       TimeRemainingColumn)

            self._progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                      TextColumn(f"{unit}"), TimeElapsedColumn(), TextColumn("eta"),
                                      TimeRemainingColumn(), TextColumn("{task.fields[info]}"), transient=transient,
                                      speed_estimate_period=300.0)  # bursty work (a group finishes at once)
            self._progress.start()
            self._task = self._progress.add_task(desc, total=total, completed=initial, info="")

    @property
    def enabled(self) -> bool:
        return self._progress is not None

    def update(self, n: int = 1, **fields: Any) -> None:
        self.n += int(n)
        if fields:
            self.fields.update(fields)
        if self._progress is None:
            return
        self._progress.update(self._task, advance=int(n), info=self._info())
        now = time.time()
        if getattr(self._progress.live, "_nested", False) and now - self._last_draw >= 0.2:
            self._last_draw = now
            self._progress.refresh()  # a nested display redraws only when asked (the outer one may never)
        if self._log_every > 0 and now >= self._next_log:
            self._next_log = now + self._log_every
            log.info(progress_line(self.desc, self.n, self.total, self.unit, now - self.t0, self.initial, self._info()))

    def set_postfix(self, **fields: Any) -> None:
        self.update(0, **fields)

    def _info(self) -> str:
        parts = []
        for k, v in self.fields.items():
            parts.append(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}")
        return "  ".join(parts)

    def close(self) -> float:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
        return time.time() - self.t0

    def __enter__(self) -> "ProgressBar":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def progress_bar(total: int | None, desc: str, unit: str = "it", enabled: bool = True, initial: int = 0,
                 transient: bool = False) -> ProgressBar:
    return ProgressBar(total, desc, unit=unit, enabled=enabled, initial=initial, transient=transient)
