"""Reading JSONL input: non-blank lines, parsed, with their line numbers (SPEC §5: blank lines
are skipped). Shared by ``quota-ledger apply`` and ``publish``."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, BinaryIO, TypeVar

from events.codec import parse_event

__all__ = ["Line", "batches", "read_lines"]

T = TypeVar("T")


@dataclass(frozen=True)
class Line:
    number: int
    item: Any  # an Event or an EventRejection
    raw: str | None


def read_lines(stream: BinaryIO, advance: Callable[[int], None]) -> Iterator[Line]:
    """Non-blank input lines, parsed. Bytes are decoded here so that a line that is not UTF-8
    is dead-lettered with that reason (and its bytes kept as ``\\xNN``) instead of crashing."""
    for number, data in enumerate(stream, 1):
        advance(len(data))
        try:
            text: str | None = data.decode("utf-8")
        except UnicodeDecodeError:
            text = None
        if text is not None:
            if not text.strip():
                continue  # blank lines are skipped (SPEC §5)
            yield Line(number, parse_event(text), text.rstrip("\r\n"))
        else:
            yield Line(number, parse_event(data), None)


def batches(lines: Iterable[T], size: int) -> Iterator[list[T]]:
    """``lines`` in lists of ``size`` (the last one shorter)."""
    batch: list[T] = []
    for line in lines:
        batch.append(line)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch
