"""Progress for people at a terminal, for cron logs and for programs.

`bar`: a rich progress bar; `plain`: a line every few seconds (stderr is not a terminal);
`json`: one JSON object a line on stderr for every event; `none`: silent.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field
from typing import TextIO


@dataclass
class Tally:
    total_chunks: int = 0
    expected_audio_s: float = 0.0
    chunks_done: int = 0
    cached: int = 0
    retries: int = 0
    failed: int = 0
    audio_s: float = 0.0
    generated_tokens: int = 0
    started: float = field(default_factory=time.perf_counter)

    @property
    def wall_s(self) -> float:
        return time.perf_counter() - self.started

    @property
    def rtf(self) -> float:
        """Wall time over audio time; cached chunks cost nothing, so they are left out."""
        fresh = self.audio_s - self.cached_audio_s
        return self.wall_s / fresh if fresh > 0 else 0.0

    cached_audio_s: float = 0.0

    @property
    def eta_s(self) -> float | None:
        fresh_done = self.audio_s - self.cached_audio_s
        if fresh_done <= 0 or self.expected_audio_s <= 0:
            return None
        remaining = max(self.expected_audio_s - self.audio_s, 0.0)
        return remaining * self.wall_s / fresh_done


def choose_mode(requested: str, quiet: bool, stream: TextIO | None = None) -> str:
    if quiet:
        return "none"
    if requested != "auto":
        return requested
    return "bar" if (stream or sys.stderr).isatty() else "plain"


class Progress:
    """Receives the renderer's events and shows them in the chosen mode."""

    def __init__(self, mode: str, stream: TextIO | None = None, plain_every_s: float = 10.0) -> None:
        self.mode = mode
        # Looked up now, not at import: tests and embedding programs swap sys.stderr.
        self.stream = stream or sys.stderr
        self.plain_every_s = plain_every_s
        self.tally = Tally()
        self._last_plain = 0.0
        self._bar = None
        self._task = None

    # events ---------------------------------------------------------------------------------
    def start(self, name: str, total_chunks: int, expected_audio_s: float) -> None:
        self.tally = Tally(total_chunks=total_chunks, expected_audio_s=expected_audio_s)
        self._name = name
        if self.mode == "bar":
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                TextColumn,
                TimeRemainingColumn,
            )
            from rich.progress import (
                Progress as RichProgress,
            )

            self._bar = RichProgress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[audio]}"),
                TextColumn("RTF {task.fields[rtf]}"),
                TimeRemainingColumn(),
                console=Console(file=self.stream),
                transient=False,
            )
            self._bar.start()
            self._task = self._bar.add_task(name, total=total_chunks, audio="0:00:00 audio", rtf="-")
        self._emit("start", book=name, chunks=total_chunks, expected_audio_s=round(expected_audio_s, 1))

    def chunk_done(self, chunk_index: int, audio_s: float, *, cached: bool, tokens: int = 0) -> None:
        t = self.tally
        t.chunks_done += 1
        t.audio_s += audio_s
        t.generated_tokens += tokens
        if cached:
            t.cached += 1
            t.cached_audio_s += audio_s
        self._emit(
            "chunk",
            chunk=chunk_index,
            cached=cached,
            audio_s=round(audio_s, 3),
            done=t.chunks_done,
            total=t.total_chunks,
            audio_total_s=round(t.audio_s, 2),
            rtf=round(t.rtf, 5),
            eta_s=None if t.eta_s is None else round(t.eta_s, 1),
        )
        self._refresh()

    def retry(self, chunk_index: int, reason: str, attempt: int) -> None:
        self.tally.retries += 1
        self._emit("retry", chunk=chunk_index, reason=reason, attempt=attempt)
        self.note(f"chunk {chunk_index}: {reason}; retrying with a new seed (attempt {attempt + 1})")

    def failed(self, chunk_index: int, reason: str) -> None:
        self.tally.failed += 1
        self._emit("failed", chunk=chunk_index, reason=reason)
        self.note(f"chunk {chunk_index} failed: {reason}; a short silence stands in its place")

    def note(self, message: str) -> None:
        """A line for the person reading (warnings, worker events)."""
        if self.mode == "json":
            self._emit("note", message=message)
        elif self.mode == "bar" and self._bar is not None:
            self._bar.console.print(f"[yellow]{message}")
        elif self.mode != "none":
            print(f"fastmaya: {message}", file=self.stream, flush=True)

    def finish(self, **fields: object) -> None:
        t = self.tally
        if self._bar is not None:
            self._refresh(force=True)
            self._bar.stop()
            self._bar = None
        summary = dict(
            chunks=t.chunks_done,
            cached=t.cached,
            failed=t.failed,
            retries=t.retries,
            audio_s=round(t.audio_s, 2),
            wall_s=round(t.wall_s, 2),
            rtf=round(t.rtf, 5),
            **fields,
        )
        if self.mode == "json":
            self._emit("finish", **summary)
        elif self.mode != "none":
            print(
                f"fastmaya: {t.chunks_done} chunks ({t.cached} from cache, {t.failed} failed), "
                f"{format_duration(t.audio_s)} of audio in {format_duration(t.wall_s)}, RTF {t.rtf:.4f}",
                file=self.stream,
                flush=True,
            )

    # output ---------------------------------------------------------------------------------
    def _emit(self, event: str, **fields: object) -> None:
        if self.mode == "json":
            print(json.dumps({"event": event, **fields}), file=self.stream, flush=True)

    def _refresh(self, force: bool = False) -> None:
        t = self.tally
        if self._bar is not None and self._task is not None:
            self._bar.update(
                self._task,
                completed=t.chunks_done,
                audio=f"{format_duration(t.audio_s)} audio",
                rtf=f"{t.rtf:.4f}" if t.rtf else "-",
            )
        elif self.mode == "plain":
            now = time.perf_counter()
            if force or now - self._last_plain >= self.plain_every_s or t.chunks_done == t.total_chunks:
                self._last_plain = now
                eta = "-" if t.eta_s is None else format_duration(t.eta_s)
                print(
                    f"fastmaya: {t.chunks_done}/{t.total_chunks} chunks, {format_duration(t.audio_s)} audio, "
                    f"RTF {t.rtf:.4f}, ETA {eta}",
                    file=self.stream,
                    flush=True,
                )


def format_duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"
