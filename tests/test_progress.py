"""Progress bars: a bar nested in another live display (Lightning's test bar, which refreshes only at its own batch
ends) redraws itself, and a long bar logs count / rate / ETA lines for jobs without a terminal."""
from __future__ import annotations

import io
import logging


from massedit.core import progress as P


def test_progress_line_rate_and_eta_count_only_this_process_work():
    line = P.progress_line("memit z", 230, 10000, "req", elapsed=76.0, initial=192)
    # 38 requests in 76 s -> 0.5 req/s; 9770 left -> 19540 s = 5:25:40
    assert line == "memit z: 230/10000 req (2.3 %), 0.5 req/s, elapsed 1:16, eta 5:25:40"
    assert P.progress_line("stats", 5, None, "tok", elapsed=2.0) == "stats: 5 tok, 2.5 tok/s, elapsed 0:02"
    assert "eta" not in P.progress_line("z", 0, 10, "req", elapsed=3.0)


def test_format_duration():
    assert P.format_duration(59.6) == "1:00"
    assert P.format_duration(3723) == "1:02:03"


def test_bar_logs_a_line_every_interval(monkeypatch, caplog):
    monkeypatch.setenv("MASSEDIT_PROGRESS_LOG_S", "10")
    clock = [1000.0]
    monkeypatch.setattr(P.time, "time", lambda: clock[0])
    with caplog.at_level(logging.INFO, logger="massedit.progress"):
        bar = P.progress_bar(100, "memit z", unit="req", enabled=True)
        clock[0] += 5
        bar.update(10)
        assert not caplog.records  # before the first interval
        clock[0] += 6
        bar.update(10, loss=0.25)
        clock[0] += 1
        bar.update(1)  # within the next interval: no line
        bar.close()
    lines = [r.getMessage() for r in caplog.records]
    assert lines == ["memit z: 20/100 req (20.0 %), 1.82 req/s, elapsed 0:11, eta 0:44  loss 0.25"]


def test_nested_bar_redraws_without_an_outer_refresh(monkeypatch):
    """The outer display refreshes only when asked (like Lightning's RichProgressBar): the inner bar's updates must
    reach the terminal anyway."""
    from rich.console import Console
    from rich.progress import Progress

    buf = io.StringIO()
    console = Console(file=buf, force_terminal=True, width=120)
    import rich

    monkeypatch.setattr(rich, "_console", console)  # what Progress() draws on by default
    outer = Progress(auto_refresh=False)
    outer.start()
    try:
        clock = [0.0]
        monkeypatch.setattr(P.time, "time", lambda: clock[0])
        bar = P.progress_bar(50, "memit z", unit="req", transient=True)
        assert bar._progress.live._nested
        for _ in range(3):
            clock[0] += 1.0
            bar.update(7)
        assert "21/50" in buf.getvalue()
        bar.close()
    finally:
        outer.stop()


def test_disabled_bar_is_inert(monkeypatch, caplog):
    monkeypatch.setenv("MASSEDIT_PROGRESS_LOG_S", "0.0001")
    with caplog.at_level(logging.INFO, logger="massedit.progress"):
        bar = P.progress_bar(3, "x", enabled=False)
        bar.update(3)
        assert bar.close() >= 0
    assert not caplog.records
