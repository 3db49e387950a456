"""Wall time and peak memory of the stages of a job (``results.json``'s ``timing`` block of an edit run).

    prof = StageProfiler()
    with activate(prof):
        with stage("load"):
            ...
        with stage("edit"):
            with stage("z"):          # nested stages: the parent's own time excludes them
                ...
    prof.summary()                    # {"total_seconds", "memory", "stages": [{stage, depth, seconds, ...}]}

Code deep inside a job (an editor) opens ``stage(name)`` without knowing whether a profiler is active (it costs
nothing when none is). Peak memory per stage: the resident set size (RSS) on every platform — on Linux the
kernel's high-water mark ``VmHWM`` is reset when a stage starts (``/proc/self/clear_refs``), elsewhere the process'
peak so far is reported (``memory.rss_scope = "process"``) — and, when CUDA is in use, ``max_memory_allocated``
(the peak statistics are reset when a stage starts). A stage entered several times (MEMIT batches) adds up its
time and keeps its largest peak.
"""
from __future__ import annotations

import contextlib
import resource
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Iterator

_ACTIVE: "StageProfiler | None" = None


def _read_hwm() -> int | None:
    """The process' RSS high-water mark in bytes (Linux ``VmHWM``; else ``ru_maxrss``)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak) * (1 if sys.platform == "darwin" else 1024)


def _reset_hwm() -> bool:
    """Reset ``VmHWM`` to the current RSS (Linux ≥ 4.0); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _cuda_in_use() -> bool:
    try:
        import torch

        return torch.cuda.is_available() and torch.cuda.is_initialized()
    except Exception:  # pragma: no cover - a broken CUDA install must not fail a job
        return False


def _cuda_peak() -> int | None:
    if not _cuda_in_use():
        return None
    import torch

    return max(int(torch.cuda.max_memory_allocated(i)) for i in range(torch.cuda.device_count()))


def _cuda_reset() -> None:
    if _cuda_in_use():
        import torch

        for i in range(torch.cuda.device_count()):
            torch.cuda.reset_peak_memory_stats(i)


def _max(a: int | None, b: int | None) -> int | None:
    return b if a is None else a if b is None else max(a, b)


@dataclass
class _Frame:
    name: str
    t0: float
    child_seconds: float = 0.0
    rss: int | None = None      # the largest peak seen in this stage so far (before a child's reset)
    cuda: int | None = None


@dataclass
class StageProfiler:
    """Records ``seconds`` (wall, children included), ``self_seconds`` (without nested stages), ``peak_rss_bytes``
    and ``peak_cuda_bytes`` per stage (keyed by its ``path`` in the nesting, e.g. ``post_eval/edit/z``), in the
    order the stages were first entered."""

    stages: dict[str, dict[str, Any]] = field(default_factory=dict)
    _stack: list[_Frame] = field(default_factory=list)
    _t0: float = field(default_factory=time.perf_counter)
    _rss_resettable: bool | None = None

    def _reset(self) -> None:
        ok = _reset_hwm()
        self._rss_resettable = ok if self._rss_resettable is None else (self._rss_resettable and ok)
        _cuda_reset()

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        if self._stack:  # the parent's peak so far, before the counters restart for this stage
            parent = self._stack[-1]
            parent.rss, parent.cuda = _max(parent.rss, _read_hwm()), _max(parent.cuda, _cuda_peak())
        self._reset()
        path = "/".join([f.name for f in self._stack] + [name])  # one record per place in the nesting
        rec = self.stages.setdefault(path, {"stage": name, "path": path, "depth": len(self._stack), "calls": 0,
                                            "seconds": 0.0, "self_seconds": 0.0, "peak_rss_bytes": None,
                                            "peak_cuda_bytes": None})
        frame = _Frame(name, time.perf_counter())
        self._stack.append(frame)
        try:
            yield
        finally:
            self._stack.pop()
            seconds = time.perf_counter() - frame.t0
            rss, cuda = _max(frame.rss, _read_hwm()), _max(frame.cuda, _cuda_peak())
            rec["calls"] += 1
            rec["seconds"] += seconds
            rec["self_seconds"] += seconds - frame.child_seconds
            rec["peak_rss_bytes"] = _max(rec["peak_rss_bytes"], rss)
            rec["peak_cuda_bytes"] = _max(rec["peak_cuda_bytes"], cuda)
            if self._stack:
                parent = self._stack[-1]
                parent.child_seconds += seconds
                parent.rss, parent.cuda = _max(parent.rss, rss), _max(parent.cuda, cuda)

    def summary(self) -> dict[str, Any]:
        """``{"total_seconds", "peak_rss_bytes", "peak_cuda_bytes", "memory": {...}, "stages": [...]}`` (JSON-able)."""
        stages = [{**r, "seconds": round(r["seconds"], 3), "self_seconds": round(r["self_seconds"], 3)}
                  for r in self.stages.values()]
        peak_rss = max((s["peak_rss_bytes"] for s in stages if s["peak_rss_bytes"] is not None), default=None)
        peak_cuda = max((s["peak_cuda_bytes"] for s in stages if s["peak_cuda_bytes"] is not None), default=None)
        return {"total_seconds": round(time.perf_counter() - self._t0, 3), "peak_rss_bytes": peak_rss,
                "peak_cuda_bytes": peak_cuda,
                "memory": {"rss": "resident set size, peak within the stage" if self._rss_resettable
                           else "resident set size, peak of the process so far",
                           "rss_scope": "stage" if self._rss_resettable else "process",
                           "cuda": "torch.cuda.max_memory_allocated within the stage (largest device)"},
                "stages": stages}


@contextlib.contextmanager
def activate(profiler: StageProfiler) -> Iterator[StageProfiler]:
    """Make ``profiler`` the one :func:`stage` records into (restores the previous one afterwards)."""
    global _ACTIVE
    prev, _ACTIVE = _ACTIVE, profiler
    try:
        yield profiler
    finally:
        _ACTIVE = prev


def active() -> StageProfiler | None:
    """The profiler :func:`stage` records into now (None outside :func:`activate`)."""
    return _ACTIVE


@contextlib.contextmanager
def stage(name: str) -> Iterator[None]:
    """Time ``name`` in the active profiler (nothing when none is active)."""
    prof = _ACTIVE
    if prof is None:
        yield
        return
    with prof.stage(name):
        yield


def timing_markdown(timing: dict[str, Any]) -> str:
    """The ``timing`` block as a Markdown table (nested stages indented)."""
    def gib(v):
        return "–" if v is None else f"{v / 1024 ** 3:.2f}"

    lines = ["## Time and memory per stage", "",
             f"Total {timing['total_seconds']:.1f} s; memory: {timing['memory']['rss']}"
             + ("; CUDA: max_memory_allocated" if timing.get("peak_cuda_bytes") is not None else "") + ".", "",
             "| stage | wall s | own s | calls | peak RSS GiB | peak CUDA GiB |", "|---|---|---|---|---|---|"]
    for s in timing["stages"]:
        name = "&nbsp;&nbsp;" * int(s["depth"]) + s["stage"]
        lines.append(f"| {name} | {s['seconds']:.2f} | {s['self_seconds']:.2f} | {s['calls']} | "
                     f"{gib(s['peak_rss_bytes'])} | {gib(s['peak_cuda_bytes'])} |")
    return "\n".join(lines) + "\n"
