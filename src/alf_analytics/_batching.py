"""Building and batching: the half of the worker thread that turns exchanges into batches.

An exchange taken off the worker's queue is built into its ALF entry, passed through
``before_send``, encoded once, and appended to the pending entries of its group (service token,
environment). A group's entries become a :class:`~alf_analytics._delivery.Batch` when they fill
``batch_size`` or ``max_batch_bytes``, when the oldest waited ``delay``, or at a flush; one
batch carries several groups (one ALF object each) when they fit. What happens to a batch
next is :class:`~alf_analytics._delivery.Delivery`'s business.

Only the worker thread calls into a :class:`Batcher`.
"""

from __future__ import annotations

import collections
import time
import traceback
from typing import Any

from ._alf import alf_envelope, build_entry
from ._alf import dumps as _dumps
from ._config import Config
from ._delivery import ENTRY_OVERHEAD_BYTES, Batch, Books, Log
from ._record import Exchange

__all__ = ["Batcher", "Group"]

#: ``(service_token, environment)``: what entries are grouped by.
GroupKey = tuple[str, str | None]


class Group:
    """The pending entries of one (service token, environment)."""

    __slots__ = ("config", "prefix", "overhead", "entries", "size", "oldest")

    def __init__(self, config: Config, key: GroupKey) -> None:
        self.config = config
        envelope = _dumps(alf_envelope(*key))
        tail = b'"entries":[]}}}'
        assert envelope.endswith(tail)
        self.prefix = envelope[: -len(b"]}}}")]
        #: '[' + prefix + ']}}}' + ']' around the entries, in a request body of its own.
        self.overhead = 1 + len(self.prefix) + 4 + 1
        self.entries: list[bytes] = []
        #: Bytes this group's ALF object takes in a request body, commas included.
        self.size = 0
        self.oldest = 0.0


class Batcher:
    """Builds exchanges into encoded entries, keeps them per group, and cuts batches."""

    __slots__ = ("groups", "seq", "_books", "_log", "_ready")

    def __init__(self, books: Books, log: Log, ready: collections.deque[Batch]) -> None:
        self.groups: dict[GroupKey, Group] = {}
        #: The sequence number of the last batch cut (a flush waits for those up to it).
        self.seq = 0
        self._books = books
        self._log = log
        #: Where a cut batch goes: the delivery's ready batches.
        self._ready = ready

    def tokens(self) -> list[str]:
        """The service tokens of every group seen (for the log's masking)."""
        return [token for token, _ in list(self.groups)]

    def add(self, exchange: Exchange) -> None:
        """Build, filter, encode and place one exchange's entry (or count why it was not)."""
        config = exchange.config
        try:
            entry: Any = build_entry(exchange)
        except Exception as exc:
            self._lose("error", "could not build an ALF entry (%r); entry dropped", exc)
            return
        hook = config.before_send
        if hook is not None:
            try:
                entry = hook(entry)
            except Exception as exc:
                # Its type and where it was raised, not its message: the message may quote the
                # entry (a header value, a body), and no request secret is logged.
                where = traceback.extract_tb(exc.__traceback__)[-1:]
                place = f" at {where[0].filename}:{where[0].lineno}" if where else ""
                self._lose(
                    "hook",
                    "before_send raised %s%s; entry dropped (counted as 'hook')",
                    type(exc).__name__,
                    place,
                )
                return
            if entry is None:
                self._books.drops["filtered"] += 1
                self._log.debug("left 1 entry out (before_send returned None)")
                return
            if not isinstance(entry, dict):
                self._lose(
                    "hook",
                    "before_send returned a %s, not a dict or None; entry dropped",
                    type(entry).__name__,
                )
                return
        try:
            data = _dumps(entry)
        except Exception as exc:  # only a before_send edit can make an entry unencodable
            self._lose("hook", "entry cannot be encoded as JSON (%r); dropped", exc)
            return
        key = exchange.group
        group = self.groups.get(key)
        if group is None:
            group = self.groups[key] = Group(config, key)
        group.config = config
        limit = config.max_batch_bytes
        if group.overhead + len(data) > limit:
            self._lose(
                "too_large",
                "an entry of %d bytes exceeds max_batch_bytes=%d; entry dropped",
                len(data),
                limit,
            )
            return
        if group.entries and group.overhead + group.size + 1 + len(data) > limit:
            self.cut([group])
        if not group.entries:
            # From when it was handed over: it may have waited in the worker's queue.
            group.oldest = time.monotonic() - max(0.0, time.perf_counter() - exchange.t_end)
            group.size = len(data)
        else:
            group.size += 1 + len(data)
        group.entries.append(data)
        books = self._books
        books.held_count += 1
        books.held_bytes += len(data) + ENTRY_OVERHEAD_BYTES
        if len(group.entries) >= config.batch_size:
            self.cut([group])

    def _lose(self, reason: str, message: str, *args: Any) -> None:
        self._books.drops[reason] += 1
        self._books.lost += 1
        # For a hook, the user's own code failed: it is said once, with what it raised.
        self._log.warn(reason, message, *args)
        self._log.debug("dropped 1 entry (%s)", reason)

    def room(self, least_batch: int, most: int) -> tuple[int, bool]:
        """Entries that may wait unseen (at most ``most``, fewer than any batch, pending or
        new, has room for), and whether a pending batch is being timed."""
        room = min(most, least_batch)
        timing = False
        for group in self.groups.values():
            if group.entries:
                timing = True
                room = min(room, group.config.batch_size - len(group.entries))
        return max(1, room), timing

    def due_times(self) -> list[float]:
        """When each group with pending entries is due (its oldest entry plus ``delay``)."""
        return [g.oldest + g.config.delay for g in self.groups.values() if g.entries]

    def cut_due(self, now: float) -> None:
        """Cut the groups whose oldest entry waited ``delay``."""
        due = [g for g in self.groups.values() if g.entries and now - g.oldest >= g.config.delay]
        if due:
            self.cut(due)

    def cut_all(self) -> None:
        self.cut(list(self.groups.values()))

    def cut(self, groups: list[Group]) -> None:
        """Turn the pending entries of ``groups`` into batches, packing several groups each."""
        parts: list[tuple[bytes, list[bytes]]] = []
        size = 2
        limit = min((g.config.max_batch_bytes for g in groups), default=0)
        for group in groups:
            if not group.entries:
                continue
            part = len(group.prefix) + 4 + group.size
            if parts and size + 1 + part > limit:
                self._enqueue(parts)
                parts, size = [], 2
            parts.append((group.prefix, group.entries))
            size += part + (1 if len(parts) > 1 else 0)
            group.entries = []
            group.size = 0
        if parts:
            self._enqueue(parts)

    def _enqueue(self, parts: list[tuple[bytes, list[bytes]]]) -> None:
        self.seq += 1
        self._ready.append(Batch(parts, self.seq))
