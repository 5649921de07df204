"""loadtest/progress.py: plain lines when stderr is no terminal, a rich live line when it is.

Strategy: plain mode is what pytest's capsys sees (its stderr is no terminal), so the default choice is
exercised as the commands make it. The live mode never needs a tty: a rich Console forced to be a
terminal writes into a StringIO, and its output (escape codes and all) must carry the label, the bar's
glyphs and the current step. No timing is asserted.
"""

from __future__ import annotations

import io
import re
import threading

from rich.console import Console

from loadtest.progress import PLAIN_LINES, is_live, progress

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def test_plain_mode_prints_bounded_count_lines(capsys) -> None:
    with progress("throughput", 25) as bar:
        assert not bar.live
        for _ in range(25):
            bar.advance(status="0 errors")
    lines = capsys.readouterr().err.splitlines()
    assert lines[-1] == "throughput: 25/25, 0 errors"
    assert all(re.fullmatch(r"throughput: \d+/25, 0 errors", line) for line in lines)
    assert 2 <= len(lines) <= PLAIN_LINES + 1  # about one per tenth, never one per request


def test_plain_mode_prints_every_step_and_note_as_is(capsys) -> None:
    with progress("overhead", 3) as bar:
        bar.step("non-streaming chat, upstream answers in 20 ms")
        bar.step("  chat c=1")
        bar.note("limits: redis-server is not installed")
        bar.step("  chat c=16")
    assert bar.done == 3  # the last step is done when the block ends
    assert capsys.readouterr().err.splitlines() == [
        "non-streaming chat, upstream answers in 20 ms", "  chat c=1",
        "limits: redis-server is not installed", "  chat c=16"]


def test_plain_mode_with_few_units_prints_each_and_unknown_total(capsys) -> None:
    with progress("parity", 2) as bar:
        bar.advance(status="1 errors")
        bar.advance(status="1 errors")
        bar.advance(status="1 errors")  # one more than planned: the total grows
    with progress("warmup", None) as bar:
        bar.advance(0, status="warmup")  # nothing done: no line
        bar.advance()
    assert capsys.readouterr().err.splitlines() == [
        "parity: 1/2, 1 errors", "parity: 2/2, 1 errors", "parity: 3/3, 1 errors", "warmup: 1"]


def test_stderr_captured_is_no_terminal(capsys) -> None:
    assert not is_live(None)
    assert not is_live(Console(stderr=True))
    assert is_live(Console(file=io.StringIO(), force_terminal=True))
    assert not is_live(Console(file=io.StringIO()))


def test_terminal_mode_drives_a_rich_live_line() -> None:
    out = io.StringIO()
    console = Console(file=out, force_terminal=True, width=120, color_system="standard")
    with progress("overhead", 4, console=console) as bar:
        assert bar.live
        bar.step("saturation, zero-latency upstream")
        bar.note("a note above the bar")
        workers = [threading.Thread(target=bar.advance) for _ in range(2)]  # from other threads too
        for t in workers:
            t.start()
        for t in workers:
            t.join(5)
    text = ANSI.sub("", out.getvalue())
    assert "overhead" in text
    assert "━" in text  # rich's bar
    assert "saturation, zero-latency upstream" in text
    assert "a note above the bar" in text
    assert "2/4" in text  # done/total: the step begun, two units done


def test_terminal_mode_counts_with_a_status() -> None:
    out = io.StringIO()
    console = Console(file=out, force_terminal=True, width=120)
    with progress("parity", 10, console=console) as bar:
        for _ in range(10):
            bar.advance(status="2 errors")
    text = ANSI.sub("", out.getvalue())
    assert "parity" in text and "━" in text and "10/10" in text and "2 errors" in text
