"""The worker: a bounded queue, batching per (service token, environment), retries.

One :class:`Worker` serves every middleware that sends to the same collector in this process.
Its daemon thread starts lazily on the first entry, so it also starts in each child of a
pre-forking server. The request path only calls :meth:`Worker.submit`, which never blocks: when
the queue is full the entry is dropped and counted. Everything else, building the ALF entry
included, happens on the worker thread.
"""

from __future__ import annotations

import atexit
import itertools
import json
import logging
import os
import random
import threading
import time
from collections.abc import Callable
from queue import Empty, SimpleQueue
from typing import Any

from ._alf import alf_envelope, build_entry
from ._alf import dumps as _dumps
from ._config import Config, mask_token
from ._record import Exchange
from ._transport import HTTPTransport, Outcome, Transport

logger = logging.getLogger("alf_analytics")

#: Drop reasons reported by :func:`stats`.
DROP_REASONS = (
    "queue_full",  # the bounded queue was full when the request finished
    "too_large",  # one entry alone exceeds max_batch_bytes (or the collector said 413)
    "rejected",  # the collector answered a 4xx other than 408/413/429
    "retries_exhausted",  # 5xx, 429 or network errors outlasted `retries`
    "shutdown",  # still queued when the shutdown bound ran out
    "error",  # an entry could not be built (a bug of ours, logged)
)
MAX_BACKOFF = 30.0
MAX_RETRY_AFTER = 120.0
#: Entries taken off the queue before due batches are checked again.
_DRAIN_CHUNK = 512
_LOG_INTERVAL = 60.0
#: How often a waiting flush() checks that the worker thread is still alive.
_REVIVE_INTERVAL = 0.05


class _Flush:
    __slots__ = ("done", "target")

    def __init__(self) -> None:
        self.done = threading.Event()
        #: The last batch cut when the worker took this marker: done once it is settled.
        self.target = 0


class _Batch:
    """One request body's worth of entries, until it is settled (sent or dropped)."""

    __slots__ = ("parts", "count", "seq", "attempt", "due")

    def __init__(self, parts: list[tuple[bytes, list[bytes]]], seq: int, attempt: int = 0) -> None:
        self.parts = parts
        self.count = sum(len(items) for _, items in parts)
        self.seq = seq
        #: Failed attempts so far.
        self.attempt = attempt
        #: When it may be tried again (monotonic seconds).
        self.due = 0.0


class _Stop:
    """Asks one worker thread to stop; a stop left over for a thread that is gone is ignored."""

    __slots__ = ("thread",)

    def __init__(self, thread: threading.Thread) -> None:
        self.thread = thread


class _Group:
    """The pending entries of one (service token, environment)."""

    __slots__ = ("config", "prefix", "entries", "size", "oldest")

    def __init__(self, config: Config) -> None:
        self.config = config
        envelope = _dumps(alf_envelope(*config.group))
        tail = b'"entries":[]}}}'
        assert envelope.endswith(tail)
        self.prefix = envelope[: -len(b"]}}}")]
        self.entries: list[bytes] = []
        #: Bytes this group's ALF object takes in a request body, commas included.
        self.size = 0
        self.oldest = 0.0

    def overhead(self) -> int:
        # '[' + prefix + ']}}}' + ']' around the entries.
        return 1 + len(self.prefix) + 4 + 1


_SUFFIX = b"]}}}"


def _body(batch: list[tuple[bytes, list[bytes]]]) -> bytes:
    return b"[" + b",".join(prefix + b",".join(items) + _SUFFIX for prefix, items in batch) + b"]"


class Worker:
    """Batches and sends the entries of every middleware that uses one collector."""

    def __init__(
        self, config: Config, transport_factory: Callable[[], Transport] | None = None
    ) -> None:
        self.collector_url = config.collector_url
        self.retries = config.retries
        self.retry_backoff = config.retry_backoff
        self.shutdown_timeout = config.shutdown_timeout
        self.queue_size = config.queue_size
        self._transport_factory = transport_factory or (
            lambda: HTTPTransport(config.collector_url, timeout=config.timeout)
        )
        self._reset()

    def _reset(self) -> None:
        """Fresh state: at construction, and in a forked child (the parent keeps its queue)."""
        self._pid = os.getpid()
        self._lock = threading.Lock()
        self._queue: SimpleQueue[Any] = SimpleQueue()
        self._thread: threading.Thread | None = None
        self._running = False
        self._transport: Transport | None = None
        self._groups: dict[tuple[str, str | None], _Group] = {}
        #: Set by close(): retries that would end after it give up (counted "shutdown").
        self._deadline: float | None = None
        #: Wakes the worker from a backoff pause (close() sets it after setting the deadline).
        self._wake = threading.Event()
        #: Flush markers taken off the queue and not answered yet (re-queued after a crash).
        self._flushes: list[_Flush] = []
        #: Entries taken off the queue that are neither pending in a group nor settled yet:
        #: a crash counts them as dropped ("error"), so sent + dropped stays equal to captured.
        self._inflight = 0
        #: Batches waiting for a retry (or for a collector that failed twice in a row); their
        #: entries count against queue_size, so memory stays bounded while it is down.
        self._retry: list[_Batch] = []
        self._held = 0
        self._seq = 0
        #: Consecutive failed requests, and the time before which nothing is sent.
        self._failures = 0
        self._blocked_until = 0.0
        # Drops on the request path use itertools counters: next() is atomic under the GIL.
        self._captured = itertools.count()
        self._queue_full = itertools.count()
        self._refused = itertools.count()
        self._counts = dict.fromkeys(("sent", "retried", "batches", "requests"), 0)
        self._drops = dict.fromkeys(DROP_REASONS, 0)
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
        if self._queue.qsize() + self._held >= self.queue_size:
            next(self._queue_full)
            self._warn(
                "queue_full", "queue full (%d entries): dropping new entries", self.queue_size
            )
            return False
        self._queue.put(exchange)
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
            thread = threading.Thread(
                target=self._run, name=f"alf-analytics-worker:{self.collector_url}", daemon=True
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

    # -- public control ---------------------------------------------------------------------

    def flush(self, timeout: float | None = None) -> bool:
        """Send everything queued so far; True when done within ``timeout`` seconds."""
        if self._pid != os.getpid():
            self._reset()
        if self._thread is threading.current_thread():
            # Called from the worker thread itself (a log handler, a callback): waiting for
            # our own marker could only time out.
            return False
        if not self._running:
            if self._queue.empty() and not self._pending() and not self._retry:
                return True
            if not self._start():
                return False
        marker = _Flush()
        self._queue.put(marker)
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            remaining = _REVIVE_INTERVAL
            if deadline is not None:
                remaining = min(remaining, deadline - time.monotonic())
                if remaining <= 0:
                    return marker.done.is_set()
            if marker.done.wait(remaining):
                return True
            # A thread that died meanwhile left the marker queued: start a fresh one.
            if not self._running and not self._start():
                return False

    def close(self, timeout: float | None = None) -> bool:
        """Flush within ``timeout``, then stop the thread. Idempotent; a later entry restarts it.

        Retries still waiting when the bound runs out give up (counted ``shutdown``); a send in
        progress is bounded by the transport's own timeout, and this call does not wait for it.
        """
        bound = self.shutdown_timeout if timeout is None else timeout
        deadline = time.monotonic() + bound
        previous = self._deadline
        if previous is None or deadline < previous:
            self._deadline = deadline
        self._wake.set()
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

        ``captured`` counts every entry handed over, so ``sent + dropped_total + queued ==
        captured``, where ``queued`` is what is waiting, batched or being sent right now.
        """
        captured = _value(self._captured)
        drops = dict(self._drops)
        drops["queue_full"] += _value(self._queue_full)
        drops["shutdown"] += _value(self._refused)
        dropped = sum(drops.values())
        sent = self._counts["sent"]
        return {
            "captured": captured,
            "sent": sent,
            "dropped": drops,
            "dropped_total": dropped,
            "retried": self._counts["retried"],
            "batches": self._counts["batches"],
            "requests": self._counts["requests"],
            "queued": max(0, captured - sent - dropped),
            "worker_restarts": self._crashes,
        }

    def _pending(self) -> int:
        return sum(len(group.entries) for group in list(self._groups.values()))

    # -- worker thread ----------------------------------------------------------------------

    def _run(self) -> None:
        try:
            self._loop()
        except BaseException as exc:  # never let the thread die silently
            self._crashes += 1
            lost, self._inflight = self._inflight, 0
            self._drops["error"] += lost
            if self._crashes == 1:
                logger.error(
                    "alf_analytics worker crashed (%d entries lost); it restarts on the next "
                    "entry: %r",
                    lost,
                    exc,
                )
        finally:
            transport, self._transport = self._transport, None
            if transport is not None:
                try:
                    transport.close()
                except Exception:  # closing is best effort
                    pass
            # Flushes this thread took but did not answer go back to the queue; their flush()
            # calls start a fresh thread (so does the next entry).
            flushes, self._flushes = self._flushes, []
            for marker in flushes:
                self._queue.put(marker)
            self._running = False

    def _loop(self) -> None:
        queue = self._queue
        me = threading.current_thread()
        flushes = self._flushes
        while True:
            wait = self._next_due()
            try:
                if wait is None:
                    item = queue.get()
                elif wait > 0:
                    item = queue.get(timeout=wait)
                else:
                    item = queue.get_nowait()
            except Empty:
                item = None
            stop = False
            taken = 0
            while item is not None:
                kind = type(item)
                if kind is _Flush:
                    # Everything queued before the marker is in a group now: cut it all.
                    self._send(list(self._groups.values()))
                    item.target = self._seq
                    flushes.append(item)
                elif kind is _Stop:
                    stop = stop or item.thread is me
                else:
                    self._add(item)
                taken += 1
                if taken >= _DRAIN_CHUNK and not stop:
                    break
                try:
                    item = queue.get_nowait()
                except Empty:
                    break
            if stop:
                self._stop()
                return
            now = time.monotonic()
            due = [
                g for g in self._groups.values() if g.entries and now - g.oldest >= g.config.delay
            ]
            if due:
                self._send(due)
            self._retry_due()
            if flushes:
                self._answer_flushes()

    def _answer_flushes(self) -> None:
        """Answer every flush whose batches are all settled (sent or dropped)."""
        oldest = min((batch.seq for batch in self._retry), default=None)
        for marker in list(self._flushes):
            if oldest is None or oldest > marker.target:
                self._flushes.remove(marker)
                marker.done.set()

    def _stop(self) -> None:
        """Send what is left, retrying within close()'s bound; give up on the rest."""
        self._send(list(self._groups.values()))
        while self._retry:
            now = time.monotonic()
            wait = max(min(batch.due for batch in self._retry), self._blocked_until) - now
            if wait > 0 and not self._pause(wait):
                break
            self._retry_due()
        self._give_up(list(self._retry))
        self._answer_flushes()

    def _next_due(self) -> float | None:
        pending = [g.oldest + g.config.delay for g in self._groups.values() if g.entries]
        if self._retry:
            pending.append(max(min(b.due for b in self._retry), self._blocked_until))
        if not pending:
            return None
        return min(pending) - time.monotonic()

    def _add(self, exchange: Exchange) -> None:
        self._inflight += 1
        try:
            data = _dumps(build_entry(exchange))
        except Exception as exc:
            self._inflight -= 1
            self._drops["error"] += 1
            self._warn("error", "could not build an ALF entry (%r); entry dropped", exc)
            return
        config = exchange.config
        group = self._groups.get(config.group)
        if group is None:
            group = self._groups[config.group] = _Group(config)
        group.config = config
        limit = config.max_batch_bytes
        if group.overhead() + len(data) > limit:
            self._inflight -= 1
            self._drops["too_large"] += 1
            self._warn(
                "too_large",
                "an entry of %d bytes exceeds max_batch_bytes=%d; entry dropped",
                len(data),
                limit,
            )
            return
        if group.entries and group.overhead() + group.size + 1 + len(data) > limit:
            self._send([group])
        if not group.entries:
            group.oldest = time.monotonic()
            group.size = len(data)
        else:
            group.size += 1 + len(data)
        group.entries.append(data)
        self._inflight -= 1
        if len(group.entries) >= config.batch_size:
            self._send([group])

    def _send(self, groups: list[_Group]) -> None:
        """Send the pending entries of ``groups``, packing several groups per request."""
        parts: list[tuple[bytes, list[bytes]]] = []
        size = 2
        limit = min((g.config.max_batch_bytes for g in groups), default=0)
        for group in groups:
            if not group.entries:
                continue
            part = len(group.prefix) + 4 + group.size
            if parts and size + 1 + part > limit:
                self._dispatch(parts)
                parts, size = [], 2
            parts.append((group.prefix, group.entries))
            size += part + (1 if len(parts) > 1 else 0)
            self._inflight += len(group.entries)
            group.entries = []
            group.size = 0
        if parts:
            self._dispatch(parts)

    def _dispatch(self, parts: list[tuple[bytes, list[bytes]]]) -> None:
        self._seq += 1
        batch = _Batch(parts, self._seq)
        if time.monotonic() < self._blocked_until:
            # The collector is failing: wait with the batches already waiting.
            batch.due = self._blocked_until
            self._hold(batch)
        else:
            self._attempt(batch)

    def _retry_due(self) -> None:
        """Try the batches whose retry time has come, oldest due first."""
        deadline = self._deadline
        if deadline is not None:
            # close() is under way: a retry that cannot happen before its bound never will.
            late = [
                batch for batch in self._retry if max(batch.due, self._blocked_until) > deadline
            ]
            self._give_up(late)
        while self._retry:
            now = time.monotonic()
            if now < self._blocked_until:
                return
            batch = min(self._retry, key=lambda b: (b.due, b.seq))
            if batch.due > now:
                return
            self._retry.remove(batch)
            self._held -= batch.count
            self._inflight += batch.count
            self._attempt(batch)

    def _give_up(self, batches: list[_Batch]) -> None:
        """Drop held batches that close()'s bound leaves no time to retry."""
        count = sum(batch.count for batch in batches)
        for batch in batches:
            self._retry.remove(batch)
            self._held -= batch.count
        if count:
            self._drops["shutdown"] += count
            self._warn("shutdown", "shutdown bound reached: %d queued entries dropped", count)

    def _hold(self, batch: _Batch) -> None:
        self._inflight = max(0, self._inflight - batch.count)
        self._retry.append(batch)
        self._held += batch.count

    def _attempt(self, batch: _Batch) -> None:
        """One request for ``batch``; a retryable failure holds it for later, never here.

        Other batches keep going out meanwhile, so an isolated 5xx costs no throughput. Two
        failures in a row mean the collector is down (or a 429 asked us to wait): then every
        send pauses, with backoff, and the next attempt is a probe.
        """
        count = batch.count
        outcome = self._post(_body(batch.parts))
        status = outcome.status
        if status in (200, 201, 202, 204, 207):
            self._settle(count)
            self._counts["sent"] += count
            self._counts["batches"] += 1
            self._failures = 0
            self._blocked_until = 0.0
            if status == 207:
                self._warn("207", "collector accepted part of a batch: %s", self._errors(outcome))
            return
        if status == 413:
            if count > 1:
                self._counts["retried"] += count
                for half in _split(batch.parts):
                    self._attempt(_Batch(half, batch.seq, batch.attempt))
                return
            self._drop("too_large", 1)
            self._warn("413", "collector refused an entry as too large (413); dropped")
            return
        if 400 <= status < 500 and status not in (408, 429):
            self._drop("rejected", count)
            self._warn(
                f"http{status}",
                "collector rejected a batch of %d entries with %d %s; dropped",
                count,
                status,
                self._errors(outcome),
            )
            return
        batch.attempt += 1
        if batch.attempt > self.retries:
            self._drop("retries_exhausted", count)
            self._warn(
                "retries_exhausted",
                "gave up on %d entries after %d attempts (%s)",
                count,
                batch.attempt,
                outcome.error or f"HTTP {status}",
            )
            return
        now = time.monotonic()
        self._failures += 1
        batch.due = now + backoff(batch.attempt, self.retry_backoff, outcome.retry_after)
        if self._failures >= 2 or outcome.retry_after is not None:
            pause = backoff(self._failures, self.retry_backoff, outcome.retry_after)
            self._blocked_until = max(self._blocked_until, now + pause)
            batch.due = max(batch.due, self._blocked_until)
        deadline = self._deadline
        if deadline is not None and batch.due > deadline:
            self._drop("shutdown", count)
            self._warn("shutdown", "shutdown bound reached: %d queued entries dropped", count)
            return
        self._counts["retried"] += count
        self._hold(batch)

    def _settle(self, count: int) -> None:
        self._inflight = max(0, self._inflight - count)

    def _drop(self, reason: str, count: int) -> None:
        self._settle(count)
        self._drops[reason] += count

    def _pause(self, seconds: float) -> bool:
        """Wait before a retry; False when close()'s deadline comes first."""
        end = time.monotonic() + seconds
        while True:
            deadline = self._deadline
            if deadline is not None and end > deadline:
                return False
            remaining = end - time.monotonic()
            if remaining <= 0:
                return True
            self._wake.wait(remaining)
            self._wake.clear()

    def _post(self, body: bytes) -> Outcome:
        self._counts["requests"] += 1
        try:
            if self._transport is None:
                self._transport = self._transport_factory()
            return self._transport.send(body)
        except Exception as exc:  # a transport must not kill the worker
            return Outcome(0, error=repr(exc))

    def _errors(self, outcome: Outcome) -> str:
        """The collector's error messages for a log line, with every service token masked."""
        text = _errors(outcome)
        for token, _ in list(self._groups):
            if token in text:
                text = text.replace(token, mask_token(token))
        return text

    def _warn(self, key: str, message: str, *args: Any) -> None:
        """Log a problem once, then at most once a minute per kind, never the token."""
        now = time.monotonic()
        last = self._logged.get(key)
        if last is not None and now - last < _LOG_INTERVAL:
            return
        self._logged[key] = now
        logger.warning("alf_analytics (%s): " + message, self.collector_url, *args)


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


def _value(counter: itertools.count[int]) -> int:
    """The next value of an itertools.count without advancing it."""
    return int(counter.__reduce__()[1][0])


def _errors(outcome: Outcome) -> str:
    """The ``errors`` of a collector answer (or the start of its body) as one line."""
    errors: Any = None
    try:
        data = json.loads(outcome.body)
        if isinstance(data, dict):
            errors = data.get("errors")
    except Exception:  # not JSON, not UTF-8, too deep: fall back to the raw text
        errors = None
    if isinstance(errors, list) and errors:
        return "; ".join(str(e)[:200] for e in errors[:5])
    if isinstance(errors, str) and errors:
        return errors[:200]
    return outcome.body[:200].decode("utf-8", "replace") or outcome.error or ""


def _split(batch: list[tuple[bytes, list[bytes]]]) -> list[list[tuple[bytes, list[bytes]]]]:
    """Halve a request by entries (for a 413), keeping each entry with its group's prefix."""
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
                config.collector_url,
                mask_token(config.service_token),
            )
    return worker


def flush(timeout: float | None = 5.0) -> bool:
    """Send everything queued in this process. True when all of it finished within ``timeout``."""
    deadline = None if timeout is None else time.monotonic() + timeout
    ok = True
    for worker in list(_workers.values()):
        remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
        ok = worker.flush(remaining) and ok
    return ok


def close(timeout: float | None = None) -> bool:
    """Flush with a bounded wait and stop the worker threads (they restart if used again)."""
    workers = list(_workers.values())
    if timeout is None:
        timeout = max((w.shutdown_timeout for w in workers), default=0.0)
    deadline = time.monotonic() + timeout
    ok = True
    for worker in workers:
        ok = worker.close(max(0.0, deadline - time.monotonic())) and ok
    return ok


def stats() -> dict[str, Any]:
    """Counters summed over every collector this process sends to."""
    total: dict[str, Any] = {
        "captured": 0,
        "sent": 0,
        "dropped": dict.fromkeys(DROP_REASONS, 0),
        "dropped_total": 0,
        "retried": 0,
        "batches": 0,
        "requests": 0,
        "queued": 0,
        "worker_restarts": 0,
    }
    for worker in list(_workers.values()):
        for key, value in worker.stats().items():
            if key == "dropped":
                for reason, count in value.items():
                    total["dropped"][reason] += count
            else:
                total[key] += value
    return total


def _at_exit() -> None:
    global _finalizing
    try:
        if not close():
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
