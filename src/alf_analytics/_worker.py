"""The worker: a bounded queue and the thread that empties it.

One :class:`Worker` serves every middleware that sends to the same collector in this process.
Its daemon thread starts lazily on the first entry, so it also starts in each child of a
pre-forking server. The request path only calls :meth:`Worker.submit`, which never blocks: when
the queue is full (in entries or in bytes) the entry is dropped and counted.

Everything else happens off the request path, on the worker thread: its
:class:`~alf_analytics._batching.Batcher` builds each ALF entry, runs ``before_send`` and cuts
batches per (service token, environment), and its :class:`~alf_analytics._delivery.Delivery`
sends them (several POSTs in flight at once) and decides what each answer means. Flush, close,
stats and fork safety are here.
"""

from __future__ import annotations

import atexit
import collections
import itertools
import logging
import os
import queue
import threading
import time
import weakref
from collections.abc import Callable
from queue import Empty, SimpleQueue
from typing import Any

from ._batching import Batcher
from ._config import Config, mask_token, mask_url
from ._delivery import (
    DROP_REASONS,
    MAX_BACKOFF,
    MAX_RETRY_AFTER,
    Books,
    Delivery,
    Done,
    Log,
    backoff,
    moved,
    url_passwords,
)
from ._record import Exchange
from ._transport import HTTPTransport, Transport

__all__ = [
    "DROP_REASONS",
    "MAX_BACKOFF",
    "MAX_RETRY_AFTER",
    "Worker",
    "backoff",
    "close",
    "flush",
    "get_worker",
    "hand_over",
    "stats",
]

logger = logging.getLogger("alf_analytics")

#: Entries taken off the queue before due batches and answers are looked at again.
_DRAIN_SLICE = 64
#: Entries waiting in the queue that wake a worker thread which is timing a batch anyway
#: (see :meth:`Worker.submit`).
_WAKE_AT = 64
#: How often a waiting flush() checks that the worker thread is still alive.
_REVIVE_INTERVAL = 0.05
#: Estimated bytes of a queued raw record besides its captured bodies (the request snapshot:
#: a WSGI environ copy or an ASGI scope, the Exchange, its header lists), and per response
#: header pair. Measured with tracemalloc for the WSGI adapter: about 2.3 KiB per request.
RAW_RECORD_BYTES = 3072
RAW_HEADER_BYTES = 120
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


class _Stop:
    """Asks one worker thread to stop; a stop left over for a thread that is gone is ignored."""

    __slots__ = ("thread",)

    def __init__(self, thread: threading.Thread) -> None:
        self.thread = thread


#: The request path's wake-up token (see :meth:`Worker.submit`).
_WAKE = object()


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
        self._passwords = url_passwords(config.collector_url)
        self._log = Log(self.shown_url, config.debug, self._tokens, self._passwords)
        self._transport_factory = transport_factory or (
            lambda: HTTPTransport(config.collector_url, timeout=config.timeout)
        )
        self._configs_seen: weakref.WeakSet[Config] = weakref.WeakSet()
        #: The smallest batch_size of any middleware that joined: a new batch's room.
        self._least_batch = config.batch_size
        self._conflicts_warned: set[str] = set()
        self._reset()

    @property
    def debug(self) -> bool:
        """Log each batch, answer and drop (any middleware of this collector asked for it)."""
        return self._log.debug_on

    @debug.setter
    def debug(self, value: bool) -> None:
        self._log.debug_on = value

    def _tokens(self) -> list[str]:
        return self._batcher.tokens()

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
        #: Set by close(): sends that cannot happen before it give up (counted "shutdown").
        self._deadline: float | None = None
        self._stopping = False
        #: The control item the thread last took off its queue (re-queued if it dies with it).
        self._in_hand: Any = None
        # What the queue holds: request threads add (under _admit), the worker subtracts.
        self._put_count = 0
        self._put_bytes = 0
        self._taken_count = 0
        self._taken_bytes = 0
        #: An entry taken off the queue and not placed yet: a crash counts it as "error".
        self._loose = 0
        self._log = Log(self.shown_url, self._log.debug_on, self._tokens, self._passwords)
        self._books = books = Books(self._log)
        self._delivery = Delivery(
            books,
            self._log,
            self._queue,
            self._transport_factory,
            max_inflight=self.max_inflight,
            retries=self.retries,
            retry_backoff=self.retry_backoff,
            shown_url=self.shown_url,
        )
        self._batcher = Batcher(books, self._log, self._delivery.ready)
        # Counters on the request path are itertools counters: next() is atomic under the GIL.
        self._captured = itertools.count()
        self._queue_full = itertools.count()
        self._refused = itertools.count()
        self._skipped = itertools.count()
        self._sampled_out = itertools.count()

    # -- request path -----------------------------------------------------------------------

    def submit(self, exchange: Exchange) -> bool:
        """Hand an exchange over without blocking. False when it had to be dropped."""
        # No pid check here: os.register_at_fork resets the worker in a forked child, and a
        # getpid() system call per request is measurable.
        next(self._captured)
        if not self._running and not self._start():
            next(self._refused)
            return False
        size = exchange.queued_bytes = raw_size(exchange)
        with self._admit:
            books = self._books
            count = self._put_count - self._taken_count + books.held_count
            held = self._put_bytes - self._taken_bytes + books.held_bytes
            full = count >= self.queue_size or held + size > self.max_queue_bytes
            if not full:
                self._put_count += 1
                self._put_bytes += size
        if full:
            next(self._queue_full)
            self._log.debug("dropped 1 entry (queue_full)")
            self._log.warn(
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
            self._queue = moved(self._queue, kind())
        self._delivery.answers = self._queue
        self._delivery.cooperative(kind)

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
        marker = _Flush(self._books.lost)
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
        books = self._books
        drops = dict(books.drops)
        drops["queue_full"] += _value(self._queue_full)
        drops["shutdown"] += _value(self._refused)
        dropped = sum(drops.values())
        sent = books.counts["sent"]
        unknown = books.counts["unknown"]
        return {
            "captured": captured,
            "sent": sent,
            "dropped": drops,
            "dropped_total": dropped,
            "unknown": unknown,
            "retried": books.counts["retried"],
            "batches": books.counts["batches"],
            "requests": books.counts["requests"],
            "queued": max(0, captured - sent - dropped - unknown),
            "in_flight": self._delivery.in_flight(),
            "skipped": _value(self._skipped),
            "sampled_out": _value(self._sampled_out),
            "worker_restarts": books.crashes,
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
            self._books.crashed(exc, lost)
        finally:
            # Flushes this thread took but did not answer go back to the queue; their flush()
            # calls start a fresh thread (so does the next entry). So does one it died
            # holding, taken off the queue and not yet among them.
            flushes, self._books.flushes = self._books.flushes, []
            held, self._in_hand = self._in_hand, None
            if type(held) is _Flush and held not in flushes:
                flushes.append(held)
            for marker in flushes:
                if not marker.done.is_set():
                    self._queue.put(marker)
            self._stopping = False
            self._running = False

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
        return self._batcher.room(self._least_batch, _WAKE_AT)

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
        if kind is Done:
            self._delivery.on_done(item)
        elif kind is _Flush:
            # Every entry handed over before flush() was called is queued: batch them all,
            # then cut everything. Held first, so a crash while building re-queues it.
            self._books.flushes.append(item)
            self._drain(None)
            self._batcher.cut_all()
            item.target = self._batcher.seq
            if self._books.lost != item.lost_before:
                item.ok = False
        elif kind is _Stop:
            if item.thread is threading.current_thread():
                self._drain(None)
                self._stopping = True

    def _tick(self) -> bool:
        """Cut due batches, start due retries and sends, answer flushes. True: stop now."""
        now = time.monotonic()
        if self._stopping:
            self._batcher.cut_all()
        else:
            self._batcher.cut_due(now)
        delivery = self._delivery
        delivery.retry_due(now)
        deadline = self._deadline
        if deadline is not None:
            delivery.give_up_late(deadline, now)
        delivery.pump()
        if self._books.flushes:
            self._answer_flushes()
        if self._stopping and (delivery.idle or (deadline is not None and now >= deadline)):
            self._answer_flushes()
            delivery.stop()
            return True
        return False

    def _next_wake(self) -> float | None:
        pending = self._batcher.due_times()
        pending.extend(self._delivery.next_due())
        if self._deadline is not None and (self._delivery.waiting or self._stopping):
            pending.append(self._deadline)
        if not pending:
            return None
        return min(pending) - time.monotonic()

    def _answer_flushes(self) -> None:
        """Answer every flush whose batches are all settled (delivered, dropped, unknown)."""
        oldest = self._delivery.oldest()
        flushes = self._books.flushes
        for marker in list(flushes):
            if oldest is None or oldest > marker.target:
                flushes.remove(marker)
                marker.done.set()

    # -- building and batching (see _batching.Batcher) ------------------------------------

    def _add(self, exchange: Exchange) -> None:
        self._loose = 1
        self._taken_count += 1
        self._taken_bytes += exchange.queued_bytes  # as submit() charged it, not measured again
        self._batcher.add(exchange)
        self._loose = 0


def hand_over(worker: Any, exchange: Exchange) -> None:
    """The adapters' last step: stamp the end and queue the exchange; never raise."""
    exchange.t_end = time.perf_counter()
    try:
        worker.submit(exchange)
    except Exception:  # defensive: an agent failure must never reach the host app
        logger.exception("alf_analytics: could not queue an entry")


def _value(counter: itertools.count[int]) -> int:
    """The next value of an itertools.count without advancing it, read from its repr
    (``count(N)``): its ``__reduce__`` warns (DeprecationWarning) since Python 3.12 and is
    gone in 3.14."""
    return int(repr(counter)[6:-1])


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


def warn_unsent(when: str) -> None:
    """After a shutdown flush ran out of time: say how many entries stay unsent, if any."""
    left = stats()["queued"]
    if left:
        logger.warning(
            "alf_analytics: %s with %d entries unsent (shutdown_timeout reached)", when, left
        )


def _at_exit() -> None:
    global _finalizing
    try:
        if not close(shutdown_bound(largest_shutdown_timeout(0.0))):
            warn_unsent("exiting")
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
