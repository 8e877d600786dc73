"""The worker: a bounded queue, batching per (service token, environment), concurrent sends.

One :class:`Worker` serves every middleware that sends to the same collector in this process.
Its daemon thread starts lazily on the first entry, so it also starts in each child of a
pre-forking server. The request path only calls :meth:`Worker.submit`, which never blocks: when
the queue is full (in entries or in bytes) the entry is dropped and counted.

Everything else happens off the request path. The worker thread owns all the state: it builds
each ALF entry, runs ``before_send``, cuts batches and decides what each answer means (retry,
split, give up). Up to ``max_inflight`` sender threads, started as needed, each own one
keep-alive connection: a sender compresses and POSTs one batch and hands the outcome back to
the worker thread through its queue, so several POSTs are in flight at once while the worker
goes on building.
"""

from __future__ import annotations

import atexit
import collections
import itertools
import json
import logging
import os
import queue
import random
import re
import threading
import time
import traceback
import uuid
import weakref
from collections.abc import Callable
from queue import Empty, SimpleQueue
from typing import Any

from ._alf import alf_envelope, build_entry
from ._alf import dumps as _dumps
from ._config import Config, mask_token, mask_url
from ._record import Exchange
from ._transport import HTTPTransport, Outcome, Transport

logger = logging.getLogger("alf_analytics")

#: Drop reasons reported by :func:`stats` (``unknown`` outcomes are counted apart).
DROP_REASONS = (
    "queue_full",  # the queue was full (queue_size entries or max_queue_bytes) at submit
    "too_large",  # one entry alone exceeds max_batch_bytes (or the collector said 413)
    "rejected",  # the collector refused it: a 4xx other than 408/413/429, or a 207's errors
    "retries_exhausted",  # 5xx, 429 or network errors outlasted `retries`
    "shutdown",  # still queued when the shutdown bound ran out
    "error",  # an entry could not be built (a bug of ours, logged)
    "hook",  # before_send raised (logged once)
    "filtered",  # before_send returned None: left out on purpose, not a loss
)
#: Settled entries that were neither delivered nor lost for sure (see :meth:`Worker.stats`).
_NOT_LOSSES = frozenset({"filtered"})
MAX_BACKOFF = 30.0
MAX_RETRY_AFTER = 120.0
#: After a 401 or 403 nothing is sent for this long; then one batch probes the collector.
AUTH_PAUSE = 60.0
#: A 400 splits the batch to find the entries the collector objects to, unless this many
#: requests in a row were answered 400: then the collector refuses everything, and a 400
#: drops the whole batch until a request is accepted again.
MAX_400_STREAK = 16
#: Entries taken off the queue before due batches and answers are looked at again.
_DRAIN_SLICE = 64
#: Entries waiting in the queue that wake a worker thread which is timing a batch anyway
#: (see :meth:`Worker.submit`).
_WAKE_AT = 64
_LOG_INTERVAL = 60.0
#: How often a waiting flush() checks that the worker thread is still alive.
_REVIVE_INTERVAL = 0.05
#: Estimated bytes of a queued raw record besides its captured bodies (the request snapshot:
#: a WSGI environ copy or an ASGI scope, the Exchange, its header lists), and per response
#: header pair. Measured with tracemalloc for the WSGI adapter: about 2.3 KiB per request.
RAW_RECORD_BYTES = 3072
RAW_HEADER_BYTES = 120
#: Bytes a built entry costs besides its JSON (the bytes object and its list slot).
ENTRY_OVERHEAD_BYTES = 48
#: Worker options that one worker shares between every middleware of its collector.
SHARED_OPTIONS = (
    "queue_size",
    "max_queue_bytes",
    "max_inflight",
    "timeout",
    "retries",
    "retry_backoff",
    "shutdown_timeout",
)


class _Flush:
    __slots__ = ("done", "target", "lost_before", "ok")

    def __init__(self, lost_before: int) -> None:
        self.done = threading.Event()
        #: The last batch cut when the worker took this marker: done once it is settled.
        self.target = 0
        #: The worker's loss counter when flush() was called, and whether all was delivered.
        self.lost_before = lost_before
        self.ok = True


class _Batch:
    """One request body's worth of entries, until it is settled (delivered, dropped, unknown)."""

    __slots__ = ("parts", "count", "size", "seq", "attempt", "due", "key", "maybe", "started")

    def __init__(self, parts: list[tuple[bytes, list[bytes]]], seq: int, attempt: int = 0) -> None:
        self.parts = parts
        self.count = sum(len(items) for _, items in parts)
        #: Bytes held for it (entries' JSON plus overhead), counted against max_queue_bytes.
        self.size = sum(len(item) + ENTRY_OVERHEAD_BYTES for _, items in parts for item in items)
        #: Flush order: split halves keep the number of the batch they came from.
        self.seq = seq
        #: Failed attempts so far.
        self.attempt = attempt
        #: When it may be tried again (monotonic seconds).
        self.due = 0.0
        #: The Idempotency-Key of every attempt of this body.
        self.key = uuid.uuid4().hex
        #: True once an attempt ended without an answer after the body was written.
        self.maybe = False
        self.started = 0.0


class _Done:
    """A sender's report: the outcome of one attempt (``None``: the sender itself crashed)."""

    __slots__ = ("batch", "outcome", "crash")

    def __init__(
        self, batch: _Batch, outcome: Outcome | None, crash: BaseException | None = None
    ) -> None:
        self.batch = batch
        self.outcome = outcome
        self.crash = crash


class _Stop:
    """Asks one worker thread to stop; a stop left over for a thread that is gone is ignored."""

    __slots__ = ("thread",)

    def __init__(self, thread: threading.Thread) -> None:
        self.thread = thread


#: The request path's wake-up token (see :meth:`Worker.submit`).
_WAKE = object()


class _Group:
    """The pending entries of one (service token, environment)."""

    __slots__ = ("config", "prefix", "overhead", "entries", "size", "oldest")

    def __init__(self, config: Config, key: tuple[str, str | None]) -> None:
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


_SUFFIX = b"]}}}"


#: Entries are joined into request body parts of about this size (see :func:`_body`).
_PART_BYTES = 32_768


def _body(batch: list[tuple[bytes, list[bytes]]]) -> list[bytes]:
    """The request body, a JSON array of one ALF object per group, as parts to compress in
    turn: never one object of the whole batch (past the allocator's threshold, every body
    would be a fresh mapping, with its page faults), and a large entry is a part by itself,
    not copied at all."""
    parts: list[bytes] = []
    pending: list[bytes] = []
    size = 0
    for prefix, items in batch:
        pending.append(b"," + prefix if parts or pending else b"[" + prefix)
        for index, item in enumerate(items):
            if index:
                pending.append(b",")
            if len(item) >= _PART_BYTES:
                parts.append(b"".join(pending))
                parts.append(item)
                pending, size = [], 0
                continue
            pending.append(item)
            size += len(item)
            if size >= _PART_BYTES:
                parts.append(b"".join(pending))
                pending, size = [], 0
        pending.append(_SUFFIX)
    pending.append(b"]")
    parts.append(b"".join(pending))
    return parts


def raw_size(exchange: Exchange) -> int:
    """What a queued exchange costs in memory, estimated cheaply (no walk over its headers)."""
    size = RAW_RECORD_BYTES + RAW_HEADER_BYTES * len(exchange.response_headers)
    body = exchange.request_body
    if body is not None:
        size += len(body)
    body = exchange.response_body
    if body is not None:
        size += len(body)
    return size


class Worker:
    """Batches and sends the entries of every middleware that uses one collector."""

    def __init__(
        self, config: Config, transport_factory: Callable[[], Transport] | None = None
    ) -> None:
        self.collector_url = config.collector_url
        #: The URL as logs and thread names show it: credentials masked.
        self.shown_url = mask_url(config.collector_url)
        self.config = config
        self.retries = config.retries
        self.retry_backoff = config.retry_backoff
        self.shutdown_timeout = config.shutdown_timeout
        self.queue_size = config.queue_size
        self.max_queue_bytes = config.max_queue_bytes
        self.max_inflight = config.max_inflight
        #: Log each batch, answer and drop (any middleware of this collector with debug=True).
        self.debug = config.debug
        self._transport_factory = transport_factory or (
            lambda: HTTPTransport(config.collector_url, timeout=config.timeout)
        )
        self._configs_seen: weakref.WeakSet[Config] = weakref.WeakSet()
        #: The smallest batch_size of any middleware that joined: a new batch's room.
        self._least_batch = config.batch_size
        self._conflicts_warned: set[str] = set()
        self._reset()

    def _reset(self) -> None:
        """Fresh state: at construction, and in a forked child (the parent keeps its queue)."""
        self._pid = os.getpid()
        self._lock = threading.Lock()
        #: Guards the request path's two counters (request threads race only each other).
        self._admit = threading.Lock()
        #: Control items for the worker thread: senders' answers, flush and stop markers, and
        #: the wake-up token the request path puts when the worker must look at its entries.
        # queue.SimpleQueue looked up now, not at import: gevent may have patched it since.
        self._queue: SimpleQueue[Any] = queue.SimpleQueue()
        #: Exchanges handed over and not taken yet (appending to a deque wakes nobody).
        self._entries: collections.deque[Exchange] = collections.deque()
        #: Set by the worker thread before it sleeps with no batch to time: the next entry must
        #: wake it. Cleared by whoever puts the wake-up token.
        self._idle = False
        #: This many waiting entries wake the thread: a slice, or fewer when a batch would fill
        #: (set by the thread before it sleeps, see :meth:`_room`).
        self._wake_at = 1
        #: A wake-up token for them is on its way (cleared when the thread drains).
        self._nudged = False
        self._thread: threading.Thread | None = None
        self._running = False
        self._groups: dict[tuple[str, str | None], _Group] = {}
        #: Set by close(): sends that cannot happen before it give up (counted "shutdown").
        self._deadline: float | None = None
        self._stopping = False
        #: Flush markers taken off the queue and not answered yet (re-queued after a crash).
        self._flushes: list[_Flush] = []
        #: The control item the thread last took off its queue (re-queued if it dies with it).
        self._in_hand: Any = None
        # What the queue holds: request threads add (under _admit), the worker subtracts.
        self._put_count = 0
        self._put_bytes = 0
        self._taken_count = 0
        self._taken_bytes = 0
        #: Entries (and bytes) taken off the queue and not settled yet: pending in a group,
        #: waiting for a sender or a retry, or in flight. They count against the bounds.
        self._held_count = 0
        self._held_bytes = 0
        #: An entry taken off the queue and not placed yet: a crash counts it as "error".
        self._loose = 0
        #: Batches ready to go, oldest first; batches waiting for their retry time.
        self._ready: collections.deque[_Batch] = collections.deque()
        self._retry: list[_Batch] = []
        self._flying: list[_Batch] = []
        self._jobs: SimpleQueue[_Batch | None] = queue.SimpleQueue()
        self._senders = 0
        #: The transport of sends made on the worker thread itself (no sender could start).
        self._inline: list[Transport] = []
        self._seq = 0
        #: Consecutive failed requests, and the time before which nothing is sent.
        self._failures = 0
        self._blocked_until = 0.0
        #: After a pause, one batch at a time until one is accepted.
        self._probing = False
        #: Why sends are paused, for the shutdown's log line ("" when not paused).
        self._paused_by = ""
        #: The close() deadline for which a paused worker probed once before giving up.
        self._probed_for: float | None = None
        self._streak_400 = 0
        #: True while the "unreachable" warning stands (a recovery is then logged once).
        self._outage = False
        # Counters on the request path are itertools counters: next() is atomic under the GIL.
        self._captured = itertools.count()
        self._queue_full = itertools.count()
        self._refused = itertools.count()
        self._skipped = itertools.count()
        self._sampled_out = itertools.count()
        self._counts = dict.fromkeys(("sent", "retried", "batches", "requests", "unknown"), 0)
        self._drops = dict.fromkeys(DROP_REASONS, 0)
        #: Entries settled without being delivered (for flush()'s answer).
        self._lost = 0
        self._logged: dict[str, float] = {}
        self._crashes = 0

    # -- request path -----------------------------------------------------------------------

    def submit(self, exchange: Exchange) -> bool:
        """Hand an exchange over without blocking. False when it had to be dropped."""
        # No pid check here: os.register_at_fork resets the worker in a forked child, and a
        # getpid() system call per request is measurable.
        next(self._captured)
        if not self._running and not self._start():
            next(self._refused)
            return False
        size = raw_size(exchange)
        with self._admit:
            count = self._put_count - self._taken_count + self._held_count
            held = self._put_bytes - self._taken_bytes + self._held_bytes
            full = count >= self.queue_size or held + size > self.max_queue_bytes
            if not full:
                self._put_count += 1
                self._put_bytes += size
        if full:
            next(self._queue_full)
            self._debug("dropped 1 entry (queue_full)")
            self._warn(
                "queue_full",
                "queue full (queue_size=%d entries, max_queue_bytes=%d): dropping new entries",
                self.queue_size,
                self.max_queue_bytes,
            )
            return False
        entries = self._entries
        entries.append(exchange)
        # Wake the worker thread only when it has to act: it sleeps with no batch to time, or
        # enough entries wait to fill a slice or a batch. Otherwise it wakes anyway when its
        # oldest pending batch is due (``delay``), and takes everything queued by then. A
        # wake-up per entry costs the app a thread switch and a GIL hand-over per request.
        if self._idle or (len(entries) >= self._wake_at and not self._nudged):
            self._idle = False
            self._nudged = True
            self._queue.put(_WAKE)
        return True

    def _start(self) -> bool:
        # Never block here: a finalizer or a logging handler that makes a request can re-enter
        # from this very thread while thread.start() runs (PITFALLS #33). A start under way,
        # on this thread or another, will drain the queue: report it as started.
        if not self._lock.acquire(blocking=False):
            return True
        try:
            if self._running:
                return True
            if _finalizing:
                return False
            self._cooperative_queues()
            thread = threading.Thread(
                target=self._run, name=f"alf-analytics-worker:{self.shown_url}", daemon=True
            )
            # Set before start(): a thread that dies at once must be able to clear it.
            self._thread = thread
            self._running = True
            try:
                thread.start()
            except RuntimeError:  # "can't create new thread at interpreter shutdown"
                self._running = False
                return False
            return True
        finally:
            self._lock.release()

    def _cooperative_queues(self) -> None:
        """Queues of the kind ``queue.SimpleQueue`` is now, before a thread starts to wait on
        them (PITFALLS #29). gevent patches it after we may have made ours (gunicorn
        ``--preload -k gevent`` imports the app first): a greenlet blocked in the C queue's
        ``get()`` froze the whole worker process, and every request after the first hung."""
        kind = queue.SimpleQueue
        if type(self._queue) is not kind:
            self._queue = _moved(self._queue, kind())
        if type(self._jobs) is not kind and not self._senders:
            self._jobs = _moved(self._jobs, kind())

    # -- public control ---------------------------------------------------------------------

    def flush(self, timeout: float | None = None) -> bool:
        """Send everything queued so far. True when all of it was delivered within ``timeout``.

        False when the time ran out, or when an entry queued before the call was dropped or
        ended with an unknown outcome meanwhile (entries ``before_send`` filtered out on
        purpose do not count as lost).
        """
        if self._pid != os.getpid():
            self._reset()
        if self._thread is threading.current_thread():
            # Called from the worker thread itself (a log handler, a callback): waiting for
            # our own marker could only time out.
            return False
        if self.stats()["queued"] == 0:
            # Nothing handed over is still waiting or in flight: delivered, or settled as a
            # loss before this call. True at once, also for flush(timeout=0).
            return True
        if not self._running and not self._start():
            return False
        marker = _Flush(self._lost)
        self._queue.put(marker)
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            remaining = _REVIVE_INTERVAL
            if deadline is not None:
                remaining = min(remaining, deadline - time.monotonic())
                if remaining <= 0:
                    return marker.done.is_set() and marker.ok
            if marker.done.wait(remaining):
                return marker.ok
            # A thread that died meanwhile left the marker queued: start a fresh one.
            if not self._running and not self._start():
                return False

    def close(self, timeout: float | None = None) -> bool:
        """Flush within ``timeout``, then stop the threads. Idempotent; a later entry restarts.

        Batches still waiting when the bound runs out give up (counted ``shutdown``, or
        ``unknown`` when an earlier attempt may have reached the collector); a send in progress
        is bounded by the transport's own timeout, and this call does not wait for it.
        """
        bound = self.shutdown_timeout if timeout is None else timeout
        deadline = time.monotonic() + bound
        previous = self._deadline
        if previous is None or deadline < previous:
            self._deadline = deadline
        try:
            done = self.flush(bound)
            thread = self._thread
            if (
                thread is not None
                and thread.is_alive()
                and thread is not threading.current_thread()
            ):
                self._queue.put(_Stop(thread))
                thread.join(max(0.0, deadline - time.monotonic()))
            return done
        finally:
            if self._deadline == deadline:
                self._deadline = None

    def stats(self) -> dict[str, Any]:
        """Counters since start (or since the fork that made this process).

        ``sent + dropped_total + unknown + queued == captured``: ``captured`` counts every entry
        handed over; ``queued`` is what is waiting, batched, waiting for a retry or in flight
        right now; ``unknown`` what was given up on after an attempt that may have reached the
        collector (a timeout after the body was sent): possibly delivered, possibly not.
        """
        captured = _value(self._captured)
        drops = dict(self._drops)
        drops["queue_full"] += _value(self._queue_full)
        drops["shutdown"] += _value(self._refused)
        dropped = sum(drops.values())
        sent = self._counts["sent"]
        unknown = self._counts["unknown"]
        return {
            "captured": captured,
            "sent": sent,
            "dropped": drops,
            "dropped_total": dropped,
            "unknown": unknown,
            "retried": self._counts["retried"],
            "batches": self._counts["batches"],
            "requests": self._counts["requests"],
            "queued": max(0, captured - sent - dropped - unknown),
            "in_flight": sum(batch.count for batch in list(self._flying)),
            "skipped": _value(self._skipped),
            "sampled_out": _value(self._sampled_out),
            "worker_restarts": self._crashes,
        }

    def adopt(self, config: Config) -> None:
        """A middleware joins this worker: warn once per shared option it asks differently."""
        if config in self._configs_seen:
            return
        self._configs_seen.add(config)
        self._least_batch = min(self._least_batch, config.batch_size)
        if config.debug:
            self.debug = True
        for name in SHARED_OPTIONS:
            asked, used = getattr(config, name), getattr(self.config, name)
            # Only an option this middleware was given: one left at its default asks nothing.
            if asked != used and name in config.given and name not in self._conflicts_warned:
                self._conflicts_warned.add(name)
                logger.warning(
                    "alf_analytics: %s=%r is ignored for %s: every middleware that sends to one "
                    "collector shares its worker, and %s=%r (from the first one) is in force",
                    name,
                    asked,
                    self.shown_url,
                    name,
                    used,
                )

    # -- worker thread ----------------------------------------------------------------------

    def _run(self) -> None:
        try:
            self._loop()
        except BaseException as exc:  # never let the thread die silently
            lost, self._loose = self._loose, 0
            self._crashed(exc, lost)
        finally:
            # Flushes this thread took but did not answer go back to the queue; their flush()
            # calls start a fresh thread (so does the next entry). So does one it died
            # holding, taken off the queue and not yet among them.
            flushes, self._flushes = self._flushes, []
            held, self._in_hand = self._in_hand, None
            if type(held) is _Flush and held not in flushes:
                flushes.append(held)
            for marker in flushes:
                if not marker.done.is_set():
                    self._queue.put(marker)
            self._stopping = False
            self._running = False

    def _crashed(self, exc: BaseException, lost: int) -> None:
        self._crashes += 1
        if lost:
            self._drops["error"] += lost
            self._lost += lost
            for marker in self._flushes:
                marker.ok = False
        if self._crashes == 1:
            logger.error(
                "alf_analytics worker crashed (%d entries lost); it restarts on the next entry: %r",
                lost,
                exc,
            )

    def _loop(self) -> None:
        queue, entries = self._queue, self._entries
        while True:
            item: Any = None
            wait = self._next_wake()
            if wait is None or wait > 0:
                # Before sleeping, say what must wake this thread; then look at the entries
                # again, so that one handed over meanwhile is not left waiting.
                self._wake_at, timing = self._room()
                # With no batch to time, the next entry must wake it.
                self._idle = not timing
                if entries and (not timing or len(entries) >= self._wake_at):
                    self._idle = False
                    wait = 0.0
            try:
                if wait is None:
                    item = self._in_hand = queue.get()
                elif wait > 0:
                    item = self._in_hand = queue.get(timeout=wait)
            except Empty:
                pass
            while True:  # control items first: answers free in-flight slots
                if item is not None and item is not _WAKE:
                    self._take(item)
                try:
                    item = self._in_hand = queue.get_nowait()
                except Empty:
                    break
            self._drain(_DRAIN_SLICE)
            if self._tick():
                return

    def _room(self) -> tuple[int, bool]:
        """Entries that may wait unseen (fewer than any batch, pending or new, has room for),
        and whether a pending batch is being timed."""
        room = min(_WAKE_AT, self._least_batch)
        timing = False
        for group in self._groups.values():
            if group.entries:
                timing = True
                room = min(room, group.config.batch_size - len(group.entries))
        return max(1, room), timing

    def _drain(self, limit: int | None) -> None:
        """Build and batch up to ``limit`` queued entries (``None``: all of them)."""
        entries = self._entries
        self._nudged = False
        taken = 0
        while entries and (limit is None or taken < limit):
            self._add(entries.popleft())
            taken += 1

    def _take(self, item: Any) -> None:
        kind = type(item)
        if kind is _Done:
            self._on_done(item)
        elif kind is _Flush:
            # Every entry handed over before flush() was called is queued: batch them all,
            # then cut everything. Held first, so a crash while building re-queues it.
            self._flushes.append(item)
            self._drain(None)
            self._cut(list(self._groups.values()))
            item.target = self._seq
            if self._lost != item.lost_before:
                item.ok = False
        elif kind is _Stop:
            if item.thread is threading.current_thread():
                self._drain(None)
                self._stopping = True

    def _tick(self) -> bool:
        """Cut due batches, start due retries and sends, answer flushes. True: stop now."""
        now = time.monotonic()
        if self._stopping:
            self._cut(list(self._groups.values()))
        else:
            due = [
                g for g in self._groups.values() if g.entries and now - g.oldest >= g.config.delay
            ]
            if due:
                self._cut(due)
        self._retry_due(now)
        deadline = self._deadline
        if deadline is not None:
            self._give_up_late(deadline, now)
        self._pump()
        if self._flushes:
            self._answer_flushes()
        if self._stopping and (
            not (self._ready or self._retry or self._flying)
            or (deadline is not None and now >= deadline)
        ):
            self._answer_flushes()
            self._stop_senders()
            _close(self._inline)
            return True
        return False

    def _next_wake(self) -> float | None:
        pending = [g.oldest + g.config.delay for g in self._groups.values() if g.entries]
        if self._retry:
            pending.append(min(b.due for b in self._retry))
        if self._ready and len(self._flying) < self._limit():
            pending.append(self._blocked_until)
        if self._deadline is not None and (self._ready or self._retry or self._stopping):
            pending.append(self._deadline)
        if not pending:
            return None
        return min(pending) - time.monotonic()

    def _answer_flushes(self) -> None:
        """Answer every flush whose batches are all settled (delivered, dropped, unknown)."""
        unsettled = [batch.seq for batch in (*self._ready, *self._retry, *self._flying)]
        oldest = min(unsettled, default=None)
        for marker in list(self._flushes):
            if oldest is None or oldest > marker.target:
                self._flushes.remove(marker)
                marker.done.set()

    # -- building and batching --------------------------------------------------------------

    def _add(self, exchange: Exchange) -> None:
        raw = raw_size(exchange)
        self._loose = 1
        self._taken_count += 1
        self._taken_bytes += raw
        config = exchange.config
        try:
            entry: Any = build_entry(exchange)
        except Exception as exc:
            self._lose_entry("error", "could not build an ALF entry (%r); entry dropped", exc)
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
                self._lose_entry(
                    "hook",
                    "before_send raised %s%s; entry dropped (counted as 'hook')",
                    type(exc).__name__,
                    place,
                )
                return
            if entry is None:
                self._loose = 0
                self._drops["filtered"] += 1
                self._debug("left 1 entry out (before_send returned None)")
                return
            if not isinstance(entry, dict):
                self._lose_entry(
                    "hook",
                    "before_send returned a %s, not a dict or None; entry dropped",
                    type(entry).__name__,
                )
                return
        try:
            data = _dumps(entry)
        except Exception as exc:  # only a before_send edit can make an entry unencodable
            self._lose_entry("hook", "entry cannot be encoded as JSON (%r); dropped", exc)
            return
        key = exchange.group
        group = self._groups.get(key)
        if group is None:
            group = self._groups[key] = _Group(config, key)
        group.config = config
        limit = config.max_batch_bytes
        if group.overhead + len(data) > limit:
            self._lose_entry(
                "too_large",
                "an entry of %d bytes exceeds max_batch_bytes=%d; entry dropped",
                len(data),
                limit,
            )
            return
        if group.entries and group.overhead + group.size + 1 + len(data) > limit:
            self._cut([group])
        if not group.entries:
            # From when it was handed over: it may have waited in the queue (see submit).
            group.oldest = time.monotonic() - max(0.0, time.perf_counter() - exchange.t_end)
            group.size = len(data)
        else:
            group.size += 1 + len(data)
        group.entries.append(data)
        self._held_count += 1
        self._held_bytes += len(data) + ENTRY_OVERHEAD_BYTES
        self._loose = 0
        if len(group.entries) >= config.batch_size:
            self._cut([group])

    def _lose_entry(self, reason: str, message: str, *args: Any) -> None:
        self._loose = 0
        self._drops[reason] += 1
        self._lost += 1
        if reason == "hook":
            # The user's own code failed: say it once, with what it raised.
            self._warn("hook", message, *args)
        else:
            self._warn(reason, message, *args)
        self._debug("dropped 1 entry (%s)", reason)

    def _cut(self, groups: list[_Group]) -> None:
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
        self._seq += 1
        self._ready.append(_Batch(parts, self._seq))

    # -- sending ----------------------------------------------------------------------------

    def _limit(self) -> int:
        return 1 if self._probing else self.max_inflight

    def _pump(self) -> None:
        """Start sends for ready batches, up to the in-flight limit, unless sends are paused."""
        ready = self._ready
        if not ready or time.monotonic() < self._blocked_until:
            return
        while ready and len(self._flying) < self._limit():
            batch = ready.popleft()
            self._flying.append(batch)
            self._counts["requests"] += 1
            batch.started = time.monotonic()
            if self._senders < len(self._flying) and not self._start_sender():
                # No thread can start (interpreter shutdown): send from this thread.
                self._on_done(_Done(batch, self._post(self._inline, batch)))
                continue
            self._jobs.put(batch)

    def _start_sender(self) -> bool:
        thread = threading.Thread(
            target=self._send_loop, name=f"alf-analytics-sender:{self.shown_url}", daemon=True
        )
        try:
            thread.start()
        except RuntimeError:  # "can't create new thread at interpreter shutdown"
            return False
        self._senders += 1
        return True

    def _stop_senders(self) -> None:
        for _ in range(self._senders):
            self._jobs.put(None)
        self._senders = 0

    def _send_loop(self) -> None:
        """A sender thread: POST each batch handed to it, report each outcome to the worker."""
        jobs, queue = self._jobs, self._queue
        line: list[Transport] = []
        batch: _Batch | None = None
        try:
            while True:
                batch = jobs.get()
                if batch is None:
                    return
                queue.put(_Done(batch, self._post(line, batch)))
                batch = None
        except BaseException as exc:  # the worker thread counts the batch and logs it
            if batch is not None:
                queue.put(_Done(batch, None, exc))
        finally:
            _close(line)

    def _post(self, line: list[Transport], batch: _Batch) -> Outcome:
        """One attempt for ``batch`` on the transport in ``line`` (made on first use)."""
        try:
            if not line:
                line.append(self._transport_factory())
            return line[0].send(_body(batch.parts), batch.key)
        except Exception as exc:  # a transport must not kill its sender
            return Outcome(0, error=repr(exc))

    def _on_done(self, done: _Done) -> None:
        batch = done.batch
        try:
            self._flying.remove(batch)
        except ValueError:  # settled already (given up at the shutdown bound)
            return
        outcome = done.outcome
        if outcome is None:
            # A sender died of a BaseException in the middle of this batch.
            self._senders = max(0, self._senders - 1)
            self._release(batch)
            self._crashed(done.crash or RuntimeError("sender crashed"), batch.count)
            return
        if self.debug:
            self._debug(
                "batch %s: %d entries, %d bytes -> %s in %.0f ms %s",
                batch.key[:8],
                batch.count,
                sum(len(item) for _, items in batch.parts for item in items),
                outcome.status or outcome.error,
                (time.monotonic() - batch.started) * 1000,
                self._errors(outcome),
            )
        status = outcome.status
        if status in (200, 201, 202, 204, 207):
            self._delivered(batch, outcome)
            return
        self._streak_400 = self._streak_400 + 1 if status == 400 else 0
        if status == 413 or (status == 400 and self._streak_400 < MAX_400_STREAK):
            if batch.count > 1:
                # Halve it (keeping each entry with its group) and try each half once: a 413
                # until they fit, a 400 until only the entries the collector objects to remain.
                self._counts["retried"] += batch.count
                self._release(batch)
                halves = [_Batch(half, batch.seq, batch.attempt) for half in _split(batch.parts)]
                for half in reversed(halves):
                    self._hold(half)
                    self._ready.appendleft(half)
                return
            if status == 413:
                self._settle(batch, "too_large")
                self._warn("413", "collector refused an entry as too large (413); dropped")
                return
        if status in (401, 403):
            self._refused_credentials(batch, outcome)
            return
        if 400 <= status < 500 and status not in (408, 429):
            self._settle(batch, "rejected")
            self._warn(
                f"http{status}",
                "collector rejected a batch of %d entries with %d %s; dropped",
                batch.count,
                status,
                self._errors(outcome),
            )
            return
        self._failed(batch, outcome)

    def _refused_credentials(self, batch: _Batch, outcome: Outcome) -> None:
        """401/403: the token (or the URL's credentials) will not work any better in a
        second. Every send pauses for ``AUTH_PAUSE``, then this batch itself finds out
        (PITFALLS #44); it is kept for up to ``retries`` such probes, so a token that an
        operator adds to the collector meanwhile costs no entry."""
        status = outcome.status
        now = time.monotonic()
        self._blocked_until = max(self._blocked_until, now + AUTH_PAUSE)
        self._probing = True
        self._paused_by = "the collector refused our credentials"
        batch.attempt += 1
        if batch.attempt > self.retries:
            self._settle(batch, "rejected")
            self._warn(
                f"http{status}",
                "collector refused our credentials (%d %s) %d times; %d entries dropped",
                status,
                self._errors(outcome),
                batch.attempt,
                batch.count,
            )
            return
        self._warn(
            "auth",
            "collector refused our credentials (%d %s): sends pause for %.0f s, then the "
            "refused batch is tried again (entries wait, bounded by queue_size and "
            "max_queue_bytes)",
            status,
            self._errors(outcome),
            AUTH_PAUSE,
        )
        batch.due = self._blocked_until
        self._counts["retried"] += batch.count
        self._retry.append(batch)

    def _delivered(self, batch: _Batch, outcome: Outcome) -> None:
        refused = _refused_entries(batch, outcome) if outcome.status == 207 else 0
        self._counts["sent"] += batch.count - refused
        self._counts["batches"] += 1
        self._release(batch)
        if refused:
            self._drops["rejected"] += refused
            self._note_loss(batch, refused)
            self._warn(
                "207",
                "collector refused %d of %d entries (207): %s",
                refused,
                batch.count,
                self._errors(outcome),
            )
        elif outcome.status == 207:
            self._warn("207", "collector accepted part of a batch: %s", self._errors(outcome))
        self._failures = 0
        self._streak_400 = 0
        self._blocked_until = 0.0
        self._probing = False
        self._paused_by = ""
        if self._outage:
            self._outage = False
            logger.warning("alf_analytics (%s): delivery recovered", self.shown_url)

    def _failed(self, batch: _Batch, outcome: Outcome) -> None:
        """A retryable failure: hold the batch for a later attempt, never retry here.

        Other batches keep going out meanwhile, so an isolated 5xx costs no throughput. Two
        failures in a row mean the collector is down (or a 429 asked us to wait): then every
        send pauses, with backoff, and the next attempt is a probe.
        """
        if outcome.maybe_delivered:
            batch.maybe = True
        status = outcome.status
        self._failures += 1
        # Not only at the first failure: one the rate limit held back is said at a later one.
        if not self._outage and (status == 0 or status >= 500):
            self._outage = (
                self._warn(
                    "down",
                    "collector unreachable or failing (%s); retrying with backoff, entries wait "
                    "(bounded by queue_size and max_queue_bytes)",
                    outcome.error or f"HTTP {status}",
                )
                or self._outage
            )
        batch.attempt += 1
        if batch.attempt > self.retries:
            reason = self._settle(batch, "retries_exhausted")
            self._warn(
                "retries_exhausted",
                "gave up on %d entries after %d attempts (%s)%s",
                batch.count,
                batch.attempt,
                outcome.error or f"HTTP {status}",
                "; they may have been delivered (counted as unknown)"
                if reason == "unknown"
                else "",
            )
            return
        now = time.monotonic()
        batch.due = now + backoff(batch.attempt, self.retry_backoff, outcome.retry_after)
        if self._failures >= 2 or outcome.retry_after is not None:
            pause = backoff(self._failures, self.retry_backoff, outcome.retry_after)
            self._blocked_until = max(self._blocked_until, now + pause)
            self._probing = True
            self._paused_by = "the collector is failing"
            batch.due = max(batch.due, self._blocked_until)
        self._counts["retried"] += batch.count
        self._retry.append(batch)

    def _retry_due(self, now: float) -> None:
        """Batches whose retry time has come go first in line, oldest first."""
        if not self._retry:
            return
        due = [batch for batch in self._retry if batch.due <= now]
        if due:
            for batch in due:
                self._retry.remove(batch)
            due.sort(key=lambda b: b.seq)
            self._ready.extendleft(reversed(due))

    def _give_up_late(self, deadline: float, now: float) -> None:
        """close() is under way: a batch that cannot be sent before its bound never will.

        Batches whose next attempt falls past the bound (sends paused after a 401/403 or by a
        failing collector's backoff) are not given up untried: one batch probes at once, and
        only if it fails too is the rest dropped.
        """
        paused = self._blocked_until > deadline or any(b.due > deadline for b in self._retry)
        if paused and now < deadline and self._probed_for != deadline:
            self._probed_for = deadline
            self._blocked_until = now
            self._probing = True
            for batch in self._retry:
                batch.due = min(batch.due, now)
            self._retry_due(now)
            return
        late = [
            batch
            for batch in self._retry
            if now >= deadline or max(batch.due, self._blocked_until) > deadline
        ]
        if now >= deadline or self._blocked_until > deadline:
            late += self._ready
            self._ready.clear()
        for batch in late:
            if batch in self._retry:
                self._retry.remove(batch)
        count = 0
        for batch in late:
            self._settle(batch, "shutdown")
            count += batch.count
        if count:
            if now >= deadline:
                why = "the shutdown bound was reached"
            else:
                why = "the next attempt falls past the shutdown bound"
                if self._paused_by:
                    why = f"{self._paused_by}, and {why}"
            self._warn("shutdown", "shutdown: %d queued entries dropped (%s)", count, why)

    # -- accounting -------------------------------------------------------------------------

    def _hold(self, batch: _Batch) -> None:
        self._held_count += batch.count
        self._held_bytes += batch.size

    def _release(self, batch: _Batch) -> None:
        self._held_count -= batch.count
        self._held_bytes -= batch.size

    def _settle(self, batch: _Batch, reason: str) -> str:
        """Give up on ``batch`` for ``reason`` (``unknown`` instead if it may have arrived)."""
        self._release(batch)
        if batch.maybe and reason in ("retries_exhausted", "shutdown"):
            reason = "unknown"
            self._counts["unknown"] += batch.count
        else:
            self._drops[reason] += batch.count
        self._note_loss(batch, batch.count)
        self._debug("dropped %d entries (%s)", batch.count, reason)
        return reason

    def _note_loss(self, batch: _Batch, count: int) -> None:
        self._lost += count
        for marker in self._flushes:
            if batch.seq <= marker.target:
                marker.ok = False

    def _errors(self, outcome: Outcome) -> str:
        """The collector's error messages for a log line, with every service token masked."""
        text = _errors(outcome)
        for token, _ in list(self._groups):
            if token and token in text:
                text = text.replace(token, mask_token(token))
        return text

    def _debug(self, message: str, *args: Any) -> None:
        if self.debug:
            logger.debug("alf_analytics (%s): " + message, self.shown_url, *args)

    def _warn(self, key: str, message: str, *args: Any) -> bool:
        """Log a problem once, then at most once a minute per kind, never the token."""
        now = time.monotonic()
        last = self._logged.get(key)
        if last is not None and now - last < _LOG_INTERVAL:
            return False
        self._logged[key] = now
        logger.warning("alf_analytics (%s): " + message, self.shown_url, *args)
        return True


def hand_over(worker: Any, exchange: Exchange) -> None:
    """The adapters' last step: stamp the end and queue the exchange; never raise."""
    exchange.t_end = time.perf_counter()
    try:
        worker.submit(exchange)
    except Exception:  # defensive: an agent failure must never reach the host app
        logger.exception("alf_analytics: could not queue an entry")


def backoff(attempt: int, base: float, retry_after: float | None = None) -> float:
    """Seconds to wait before retry number ``attempt`` (1-based).

    Capped exponential backoff with jitter (half to all of ``base * 2**(attempt-1)``, at most
    :data:`MAX_BACKOFF`); a ``Retry-After`` from the collector is a floor (at most
    :data:`MAX_RETRY_AFTER`).
    """
    pause = min(MAX_BACKOFF, base * 2.0 ** min(attempt - 1, 62))
    pause *= random.uniform(0.5, 1.0)
    if retry_after is not None:
        pause = max(pause, min(retry_after, MAX_RETRY_AFTER))
    return pause


def _close(line: list[Transport]) -> None:
    for transport in line:
        try:
            transport.close()
        except Exception:  # closing is best effort
            pass
    line.clear()


def _moved(old: Any, new: Any) -> Any:
    """``new``, holding what ``old`` held (nothing takes from ``old`` meanwhile)."""
    while True:
        try:
            new.put(old.get_nowait())
        except Empty:
            return new


def _value(counter: itertools.count[int]) -> int:
    """The next value of an itertools.count without advancing it."""
    return int(counter.__reduce__()[1][0])


def _answer(outcome: Outcome) -> Any:
    try:
        return json.loads(outcome.body)
    except Exception:  # not JSON, not UTF-8, too deep
        return None


def _errors(outcome: Outcome) -> str:
    """The ``errors`` of a collector answer (or the start of its body) as one line."""
    data = _answer(outcome)
    errors = data.get("errors") if isinstance(data, dict) else None
    if isinstance(errors, list) and errors:
        return "; ".join(str(e)[:200] for e in errors[:5])
    if isinstance(errors, str) and errors:
        return errors[:200]
    return outcome.body[:200].decode("utf-8", "replace") or outcome.error or ""


_ALF_INDEX = re.compile(r"^\s*ALF\[(\d+)\](?:\s*entry\[(\d+)\])?", re.IGNORECASE)


def _refused_entries(batch: _Batch, outcome: Outcome) -> int:
    """How many entries of ``batch`` a 207 answer says were not stored, per ALF object.

    Read from ``"rejected": [n per ALF object]`` when the collector gives it, else from its
    ``errors``: ``"ALF[i] entry[j] ..."`` is one entry of ALF object ``i``, ``"ALF[i] ..."``
    all of them. Errors that name no ALF object cannot be placed and count nothing: the rest
    of the batch was stored, so it counts as sent.
    """
    sizes = [len(items) for _, items in batch.parts]
    data = _answer(outcome)
    if not isinstance(data, dict):
        return 0
    rejected = data.get("rejected")
    if isinstance(rejected, list) and len(rejected) == len(sizes):
        if all(isinstance(n, int) and not isinstance(n, bool) for n in rejected):
            return sum(max(0, min(n, size)) for n, size in zip(rejected, sizes, strict=True))
    errors = data.get("errors")
    if not isinstance(errors, list):
        return 0
    whole: set[int] = set()
    entries: set[tuple[int, int]] = set()
    for error in errors:
        match = _ALF_INDEX.match(error) if isinstance(error, str) else None
        if match is None:
            continue
        index = int(match.group(1))
        if index >= len(sizes):
            continue
        if match.group(2) is None:
            whole.add(index)
        elif int(match.group(2)) < sizes[index]:
            entries.add((index, int(match.group(2))))
    return sum(sizes[i] for i in whole) + sum(1 for i, _ in entries if i not in whole)


def _split(batch: list[tuple[bytes, list[bytes]]]) -> list[list[tuple[bytes, list[bytes]]]]:
    """Halve a request by entries, keeping each entry with its group's prefix."""
    flat = [(prefix, item) for prefix, items in batch for item in items]
    middle = len(flat) // 2
    halves = []
    for part in (flat[:middle], flat[middle:]):
        grouped: dict[bytes, list[bytes]] = {}
        for prefix, item in part:
            grouped.setdefault(prefix, []).append(item)
        halves.append(list(grouped.items()))
    return halves


# -- the process-wide registry ------------------------------------------------------------------

_workers: dict[str, Worker] = {}
_registry_lock = threading.Lock()
_finalizing = False


def get_worker(config: Config) -> Worker:
    """The worker for ``config.collector_url`` (created on first use)."""
    worker = _workers.get(config.collector_url)
    if worker is None:
        created = False
        with _registry_lock:
            worker = _workers.get(config.collector_url)
            if worker is None:
                worker = _workers[config.collector_url] = Worker(config)
                created = True
        if created:
            # Logged outside the lock: a handler that builds a middleware must not deadlock.
            logger.debug(
                "alf_analytics: worker for %s (token %s)",
                worker.shown_url,
                mask_token(config.service_token),
            )
    worker.adopt(config)
    return worker


def count_skipped(config: Config) -> None:
    """Count a request that ``skip_paths``/``skip_methods``/``skip`` left out (no entry)."""
    worker = _workers.get(config.collector_url) or get_worker(config)
    next(worker._skipped)


def count_sampled_out(config: Config) -> None:
    """Count a request that ``sample_rate`` left out (no entry)."""
    worker = _workers.get(config.collector_url) or get_worker(config)
    next(worker._sampled_out)


def flush(timeout: float | None = 5.0) -> bool:
    """Send everything queued in this process. True when all of it was delivered in time."""
    deadline = None if timeout is None else time.monotonic() + timeout
    ok = True
    for worker in list(_workers.values()):
        remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
        ok = worker.flush(remaining) and ok
    return ok


def largest_shutdown_timeout(default: float) -> float:
    """The largest ``shutdown_timeout`` in force among this process's workers."""
    return max((w.shutdown_timeout for w in list(_workers.values())), default=default)


def close(timeout: float | None = None) -> bool:
    """Flush with a bounded wait and stop the worker threads (they restart if used again)."""
    workers = list(_workers.values())
    if timeout is None:
        timeout = largest_shutdown_timeout(0.0)
    deadline = time.monotonic() + timeout
    ok = True
    for worker in workers:
        ok = worker.close(max(0.0, deadline - time.monotonic())) and ok
    return ok


_SUMMED = (
    "captured",
    "sent",
    "dropped_total",
    "unknown",
    "retried",
    "batches",
    "requests",
    "queued",
    "in_flight",
    "skipped",
    "sampled_out",
    "worker_restarts",
)


def stats() -> dict[str, Any]:
    """Counters summed over every collector this process sends to."""
    total: dict[str, Any] = dict.fromkeys(_SUMMED, 0)
    total["dropped"] = dict.fromkeys(DROP_REASONS, 0)
    for worker in list(_workers.values()):
        for key, value in worker.stats().items():
            if key == "dropped":
                for reason, count in value.items():
                    total["dropped"][reason] += count
            else:
                total[key] += value
    return total


#: The clock of :func:`shutdown_bound` (a test may replace it).
_monotonic = time.monotonic
#: The shutdown flush under way: its deadline, and the workers and entries captured then.
_shutdown: tuple[float, tuple[tuple[int, int], ...]] | None = None


def shutdown_bound(timeout: float) -> float:
    """How long a flush at shutdown may wait: ``timeout``, less what the shutdown flushes
    before it already spent when no entry was captured since.

    A process often meets several hooks on its way out (the lifespan flush of each nested
    middleware, FlushOnShutdown, the SIGTERM helper, then ``atexit``): they share one
    ``shutdown_timeout`` instead of each waiting its own for the same unsent entries. An
    entry captured after the last one began (an app that serves again) starts a new bound.
    """
    global _shutdown
    now = _monotonic()
    seen = tuple((id(worker), _value(worker._captured)) for worker in list(_workers.values()))
    if _shutdown is not None and _shutdown[1] == seen:
        return max(0.0, min(timeout, _shutdown[0] - now))
    _shutdown = (now + timeout, seen)
    return timeout


def _at_exit() -> None:
    global _finalizing
    try:
        if not close(shutdown_bound(largest_shutdown_timeout(0.0))):
            left = stats()["queued"]
            if left:
                logger.warning(
                    "alf_analytics: exiting with %d entries unsent (shutdown_timeout reached)", left
                )
    finally:
        _finalizing = True


def _after_fork_in_child() -> None:
    global _registry_lock
    _registry_lock = threading.Lock()
    for worker in _workers.values():
        worker._reset()


atexit.register(_at_exit)
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
