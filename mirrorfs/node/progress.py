"""Progress of long operations for people: a rich progress bar on a terminal, plain lines
otherwise (a log file or a pipe gets no cursor movement and no redraws).

``follow_link`` follows one link of a node's status document (an initial sync or a resync
to a target) until it streams; ``spinner`` shows that a blocking request (``verify``) is
still running; ``phase_bar`` draws how far each pass of a check is (``fsck``), and
``slow_notice`` says that a short operation (``promote``, ``switchover``) is taking long.
"""

from __future__ import annotations

import contextlib
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    Progress,
    SpinnerColumn,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from mirrorfs.node.status_view import fmt_sync

PLAIN_EVERY = 5.0  # seconds between plain progress lines


class ProgressTimeout(Exception):
    """The link did not reach streaming in time (one line)."""


def _console() -> Console:
    return Console(file=sys.stderr, highlight=False, emoji=False)


def follow_link(
    fetch: Callable[[], dict[str, Any] | None],
    label: str,
    *,
    timeout: float,
    interval: float = 0.2,
    console: Console | None = None,
) -> dict[str, Any]:
    """Poll ``fetch()`` (the link, None while unknown) until its state is ``streaming`` and
    return it; a bar on a terminal, a line every few seconds otherwise."""
    console = console or _console()
    deadline = time.monotonic() + timeout
    if console.is_terminal:
        columns = (
            TextColumn("{task.description}"),
            BarColumn(),
            TaskProgressColumn(),
            TimeRemainingColumn(),
            TimeElapsedColumn(),
        )
        with Progress(*columns, console=console, transient=False) as bar:
            task = bar.add_task(f"{label}: connecting", total=None)
            return _poll(fetch, deadline, interval, lambda link: _draw(bar, task, label, link))
    last = [0.0, ""]

    def plain(link: dict[str, Any] | None) -> None:
        line = _plain_line(label, link)
        now = time.monotonic()
        if line != last[1] and (now - last[0] >= PLAIN_EVERY or not link or not link["sync"]):
            print(line, file=sys.stderr, flush=True)
            last[:] = [now, line]

    return _poll(fetch, deadline, interval, plain)


def _poll(fetch, deadline: float, interval: float, show) -> dict[str, Any]:
    while True:
        link = fetch()
        show(link)
        if link is not None and link["state"] == "streaming" and not link.get("sync"):
            return link
        if time.monotonic() > deadline:
            state = link["state"] if link else "unknown"
            reason = f" ({link['reason']})" if link and link.get("reason") else ""
            raise ProgressTimeout(f"not streaming yet: {state}{reason}")
        time.sleep(interval)


def _plain_line(label: str, link: dict[str, Any] | None) -> str:
    if link is None:
        return f"{label}: waiting"
    if link.get("sync"):
        return f"{label}: {fmt_sync(link['sync'])}"
    reason = f" ({link['reason']})" if link.get("reason") else ""
    return f"{label}: {link['state']}{reason}"


def _draw(bar: Progress, task: Any, label: str, link: dict[str, Any] | None) -> None:
    if link is None:
        return
    sync = link.get("sync")
    if sync and sync.get("blocks_total"):
        what = "initial sync" if sync["kind"] == "initial-sync" else f"resync ({sync['phase']})"
        bar.update(task, description=f"{label}: {what}", total=sync["blocks_total"],
                   completed=sync["blocks_done"])  # fmt: skip
    elif link["state"] == "streaming":
        total = bar.tasks[0].total or 1
        bar.update(task, description=f"{label}: streaming", total=total, completed=total)
    else:
        bar.update(task, description=f"{label}: {link['state']}")


@contextlib.contextmanager
def spinner(text: str, *, console: Console | None = None) -> Iterator[None]:
    """A spinner with the time elapsed while the block runs (terminal only)."""
    console = console or _console()
    if not console.is_terminal:
        yield
        return
    columns = (SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=True) as bar:
        bar.add_task(text, total=None)
        yield


@contextlib.contextmanager
def phase_bar(
    label: str, *, console: Console | None = None
) -> Iterator[Callable[[str, int, int], None]]:
    """A bar for a job of passes: yields ``progress(phase, done, total)``, which redraws it
    on a terminal (``label: phase``, percent, time) and does nothing otherwise."""
    console = console or _console()
    if not console.is_terminal:
        yield lambda phase, done, total: None
        return
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        TaskProgressColumn(),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=console, transient=False) as bar:
        task = bar.add_task(f"{label}: starting", total=1)

        def progress(phase: str, done: int, total: int) -> None:
            bar.update(task, description=f"{label}: {phase}", total=max(total, 1),
                       completed=min(done, max(total, 1)))  # fmt: skip

        yield progress
        bar.update(task, description=f"{label}: done", total=1, completed=1)


@contextlib.contextmanager
def slow_notice(text: str, *, after: float = 1.0, stream: Any = None) -> Iterator[None]:
    """On a terminal, once the block has run ``after`` seconds: ``text... N s``, redrawn
    every second in place, then ``text... done (N.N s)``. Nothing off a terminal, nor for
    a block that ends sooner."""
    stream = stream or sys.stderr
    if not stream.isatty():
        yield
        return
    t0, done, shown = time.monotonic(), threading.Event(), [False]

    def tick() -> None:
        wait = after
        while not done.wait(wait):
            stream.write(f"\r{text}... {time.monotonic() - t0:.0f} s")
            stream.flush()
            shown[0], wait = True, 1.0

    thread = threading.Thread(target=tick, name="slow-notice", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()
        if shown[0]:
            stream.write(f"\r{text}... done ({time.monotonic() - t0:.1f} s)\n")
            stream.flush()
