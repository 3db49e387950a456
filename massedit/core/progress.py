"""One progress library for every long step (rich): statistics, template sampling, target optimisation, MEND
factors, sweep trials; Lightning's own stages use ``RichProgressBar`` (:func:`massedit.trainer.build_trainer`).

    bar = progress_bar(total, "memit z", unit="req")
    bar.update(1, loss=0.42)          # advance and/or show fields (loss, requests done, ...)
    bar.close()

Nested bars work (rich >= 14 stacks live displays, e.g. a z bar inside Lightning's test bar). Disabled bars
(``enabled=False``, or ``MASSEDIT_PROGRESS=0``) cost nothing.
"""
from __future__ import annotations

import os
import time
from typing import Any


class ProgressBar:
    """A rich progress bar with a count, rate, elapsed / remaining time and free-form fields."""

    def __init__(self, total: int | None, desc: str, unit: str = "it", enabled: bool = True, initial: int = 0,
                 transient: bool = False):
        self.total, self.desc, self.unit = total, desc, unit
        self.n = int(initial)
        self.fields: dict[str, Any] = {}
        self.t0 = time.time()
        self._progress = self._task = None
        if enabled and os.environ.get("MASSEDIT_PROGRESS", "1") not in ("0", "false", "no"):
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                                       TimeRemainingColumn)

            self._progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                      TextColumn(f"{unit}"), TimeElapsedColumn(), TextColumn("eta"),
                                      TimeRemainingColumn(), TextColumn("{task.fields[info]}"), transient=transient)
            self._progress.start()
            self._task = self._progress.add_task(desc, total=total, completed=initial, info="")

    @property
    def enabled(self) -> bool:
        return self._progress is not None

    def update(self, n: int = 1, **fields: Any) -> None:
        self.n += int(n)
        if fields:
            self.fields.update(fields)
        if self._progress is not None:
            self._progress.update(self._task, advance=int(n), info=self._info())

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
