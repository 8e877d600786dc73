"""Delivery: the batches cut and not settled yet, the sender threads, and what each answer of
the collector means (deliver, split, retry, pause, give up).

The worker thread (:class:`~alf_analytics._worker.Worker`) owns a :class:`Delivery` and calls
it; up to ``max_inflight`` sender threads, started as POSTs overlap, each own one keep-alive
connection: a sender compresses and POSTs one batch and hands the outcome back through the
worker's queue, so several POSTs are in flight at once while the worker goes on building.
:class:`Books` keeps what the worker holds and what became of each entry (the counters behind
``stats()``), and :class:`Log` its rate-limited log lines.
"""

from __future__ import annotations

import collections
import json
import logging
import queue
import random
import re
import threading
import time
import uuid
from collections.abc import Callable
from queue import Empty, SimpleQueue
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlsplit

from ._config import mask_token, mask_url
from ._transport import Outcome, Transport

if TYPE_CHECKING:
    from ._worker import _Flush

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
MAX_BACKOFF = 30.0
MAX_RETRY_AFTER = 120.0
#: After a 401 or 403 nothing of that service token (and environment) is sent for this long;
#: then one of its batches probes the collector. Other tokens' entries keep going.
AUTH_PAUSE = 60.0
#: A 400 splits the batch to find the entries the collector objects to, unless this many
#: requests in a row were answered 400: then the collector refuses everything, and a 400
#: drops the whole batch until a request is accepted again.
MAX_400_STREAK = 16
#: Bytes a built entry costs besides its JSON (the bytes object and its list slot).
ENTRY_OVERHEAD_BYTES = 48
_LOG_INTERVAL = 60.0


class Log:
    """The worker's log lines: a problem once, then at most once a minute per kind; debug lines
    when any middleware of the collector asked for them; never a service token."""

    __slots__ = ("shown_url", "debug_on", "tokens", "passwords", "_logged")

    def __init__(
        self,
        shown_url: str,
        debug_on: bool,
        tokens: Callable[[], list[str]],
        passwords: tuple[str, ...] = (),
    ) -> None:
        self.shown_url = shown_url
        self.debug_on = debug_on
        #: The service tokens a collector answer may quote (masked in log lines).
        self.tokens = tokens
        #: The password of ``collector_url`` (as written and decoded): an answer may quote it.
        self.passwords = passwords
        self._logged: dict[str, float] = {}

    def errors(self, outcome: Outcome) -> str:
        """The collector's error messages for a log line, with every service token masked."""
        text = _errors(outcome)
        for token in self.tokens():
            if token and token in text:
                text = text.replace(token, mask_token(token))
        for password in self.passwords:
            text = text.replace(password, "***")
        return text

    def debug(self, message: str, *args: Any) -> None:
        if self.debug_on:
            logger.debug("alf_analytics (%s): " + message, self.shown_url, *args)

    def warn(self, key: str, message: str, *args: Any) -> bool:
        """Log a problem once, then at most once a minute per kind, never the token."""
        now = time.monotonic()
        last = self._logged.get(key)
        if last is not None and now - last < _LOG_INTERVAL:
            return False
        self._logged[key] = now
        logger.warning("alf_analytics (%s): " + message, self.shown_url, *args)
        return True


class Books:
    """What the worker holds and what became of each entry: the counters behind ``stats()``.

    ``held_count``/``held_bytes`` are the entries (and bytes) taken off the queue and not settled
    yet: pending in a group, waiting for a sender or a retry, or in flight. They count against
    ``queue_size`` and ``max_queue_bytes`` as the queue itself does.
    """

    __slots__ = ("held_count", "held_bytes", "counts", "drops", "lost", "crashes", "flushes", "log")

    def __init__(self, log: Log) -> None:
        self.held_count = 0
        self.held_bytes = 0
        self.counts = dict.fromkeys(("sent", "retried", "batches", "requests", "unknown"), 0)
        self.drops = dict.fromkeys(DROP_REASONS, 0)
        #: Entries settled without being delivered (for flush()'s answer).
        self.lost = 0
        #: Times the worker thread (or a sender) died of an error of ours.
        self.crashes = 0
        #: Flush markers taken off the queue and not answered yet (re-queued after a crash).
        self.flushes: list[_Flush] = []
        self.log = log

    def hold(self, batch: Batch) -> None:
        self.held_count += batch.count
        self.held_bytes += batch.size

    def release(self, batch: Batch) -> None:
        self.held_count -= batch.count
        self.held_bytes -= batch.size

    def settle(self, batch: Batch, reason: str) -> str:
        """Give up on ``batch`` for ``reason`` (``unknown`` instead if it may have arrived)."""
        self.release(batch)
        if batch.maybe and reason in ("retries_exhausted", "shutdown"):
            reason = "unknown"
            self.counts["unknown"] += batch.count
        else:
            self.drops[reason] += batch.count
        self.note_loss(batch, batch.count)
        self.log.debug("dropped %d entries (%s)", batch.count, reason)
        return reason

    def note_loss(self, batch: Batch, count: int) -> None:
        self.lost += count
        for marker in self.flushes:
            if batch.seq <= marker.target:
                marker.ok = False

    def lose(self, reason: str, count: int) -> None:
        """``count`` entries lost before they were batched (every waiting flush fails)."""
        self.drops[reason] += count
        self.lost += count
        for marker in self.flushes:
            marker.ok = False

    def crashed(self, exc: BaseException, lost: int) -> None:
        self.crashes += 1
        if lost:
            self.lose("error", lost)
        if self.crashes == 1:
            logger.error(
                "alf_analytics worker crashed (%d entries lost); it restarts on the next entry: %r",
                lost,
                exc,
            )


class Batch:
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


class Done:
    """A sender's report: the outcome of one attempt (``None``: the sender itself crashed)."""

    __slots__ = ("batch", "outcome", "crash")

    def __init__(
        self, batch: Batch, outcome: Outcome | None, crash: BaseException | None = None
    ) -> None:
        self.batch = batch
        self.outcome = outcome
        self.crash = crash


class _Refusal:
    """One group's standing refusal: its batches wait until ``until``, then one probes."""

    __slots__ = ("until", "held", "probe")

    def __init__(self, until: float) -> None:
        self.until = until
        #: Batches of this group kept back, oldest first (the first one probes next).
        self.held: list[Batch] = []
        #: The batch out to find out whether the collector accepts the group now.
        self.probe: Batch | None = None


class Refusals:
    """The groups whose credentials the collector refused (401/403), by their ALF prefix
    (service token and environment), with the batches kept back for them.

    One tenant's revoked token must not hold the others' entries back (nor fill the queue
    until they are dropped): only the refused group pauses, and its own batches wait here,
    still counted against ``queue_size``.
    """

    __slots__ = ("groups",)

    def __init__(self) -> None:
        self.groups: dict[bytes, _Refusal] = {}

    def __bool__(self) -> bool:
        return bool(self.groups)

    def pause(self, prefix: bytes, until: float) -> _Refusal:
        refusal = self.groups.get(prefix)
        if refusal is None:
            refusal = self.groups[prefix] = _Refusal(until)
        refusal.until = until
        return refusal

    def answered(self, batch: Batch) -> None:
        """An answer came for ``batch``: if it was a probe, the group may probe again."""
        for refusal in self.groups.values():
            if refusal.probe is batch:
                refusal.probe = None

    def accepted(self, batch: Batch) -> list[Batch]:
        """The collector took ``batch``: its groups are no longer refused; their batches."""
        freed: list[Batch] = []
        for prefix, _ in batch.parts:
            refusal = self.groups.pop(prefix, None)
            if refusal is not None:
                freed += refusal.held
        freed.sort(key=lambda b: b.seq)
        return freed

    def probes(self, now: float) -> list[Batch]:
        """For each group whose pause is over and that has no probe out: its next probe."""
        out = []
        for refusal in self.groups.values():
            if refusal.held and refusal.probe is None and now >= refusal.until:
                refusal.probe = refusal.held.pop(0)
                out.append(refusal.probe)
        return out

    def batches(self) -> list[Batch]:
        return [batch for refusal in self.groups.values() for batch in refusal.held]

    def holding(self) -> bool:
        """Whether any group keeps batches back."""
        return any(refusal.held for refusal in self.groups.values())

    def next_due(self) -> list[float]:
        return [r.until for r in self.groups.values() if r.held and r.probe is None]

    def past(self, deadline: float) -> bool:
        """Whether a group's batches wait past ``deadline``."""
        return any(r.held and r.until > deadline for r in self.groups.values())

    def lift(self, now: float) -> None:
        """Every refused group may probe now (close() tries once before giving up)."""
        for refusal in self.groups.values():
            refusal.until = min(refusal.until, now)

    def late(self, deadline: float, now: float) -> list[Batch]:
        """Take out the batches that wait past ``deadline`` (all of them once it passed)."""
        out: list[Batch] = []
        for refusal in self.groups.values():
            if now >= deadline or refusal.until > deadline:
                out += refusal.held
                refusal.held = []
        return out


class Delivery:
    """The batches cut and not settled yet, and what each answer of the collector means.

    A batch is ready (oldest first), in flight (at most ``max_inflight``, one while probing),
    or waiting for its retry time; two failures in a row pause every send, a 401/403 the sends
    of the refused group (:class:`Refusals`), and the next attempt is a probe. Runs on the
    worker thread; only the senders' loop does not.
    """

    def __init__(
        self,
        books: Books,
        log: Log,
        answers: SimpleQueue[Any],
        transport_factory: Callable[[], Transport],
        *,
        max_inflight: int,
        retries: int,
        retry_backoff: float,
        shown_url: str,
    ) -> None:
        self.books = books
        self.log = log
        #: The worker's queue: the senders put each outcome there (a ``Done``).
        self.answers = answers
        self._transport_factory = transport_factory
        self.max_inflight = max_inflight
        self.retries = retries
        self.retry_backoff = retry_backoff
        self.shown_url = shown_url
        #: Batches ready to go, oldest first; batches waiting for their retry time; in flight.
        self.ready: collections.deque[Batch] = collections.deque()
        self.retry: list[Batch] = []
        self.flying: list[Batch] = []
        self.jobs: SimpleQueue[Batch | None] = queue.SimpleQueue()
        self.senders = 0
        #: The transport of sends made on the worker thread itself (no sender could start).
        self.inline: list[Transport] = []
        #: Consecutive failed requests, and the time before which nothing is sent.
        self.failures = 0
        self.blocked_until = 0.0
        #: After a pause, one batch at a time until one is accepted.
        self.probing = False
        #: Groups whose credentials the collector refused, with their batches kept back.
        self.refused = Refusals()
        #: Why sends are paused, for the shutdown's log line ("" when not paused).
        self.paused_by = ""
        #: The close() deadline for which a paused delivery probed once before giving up.
        self.probed_for: float | None = None
        self.streak_400 = 0
        #: True while the "unreachable" warning stands (a recovery is then logged once).
        self.outage = False

    @property
    def waiting(self) -> bool:
        """Batches ready or waiting for a retry (not counting those in flight)."""
        return bool(self.ready or self.retry or self.refused.holding())

    @property
    def idle(self) -> bool:
        """Nothing left to send: no batch ready, waiting for a retry or in flight."""
        return not (self.ready or self.retry or self.flying or self.refused.holding())

    def oldest(self) -> int | None:
        """The sequence number of the oldest unsettled batch (None: all settled)."""
        batches = (*self.ready, *self.retry, *self.flying, *self.refused.batches())
        return min((b.seq for b in batches), default=None)

    def next_due(self) -> list[float]:
        """When a retry falls due, and when a pause ends that holds a ready batch back."""
        due = []
        if self.retry:
            due.append(min(b.due for b in self.retry))
        if self.ready and len(self.flying) < self.limit():
            due.append(self.blocked_until)
        if self.refused:
            due += self.refused.next_due()
        return due

    def in_flight(self) -> int:
        return sum(batch.count for batch in list(self.flying))

    def cooperative(self, kind: type[SimpleQueue[Any]]) -> None:
        """Use a job queue of ``kind`` (see ``Worker._cooperative_queues``), while no sender
        waits on the old one."""
        if type(self.jobs) is not kind and not self.senders:
            self.jobs = moved(self.jobs, kind())

    def limit(self) -> int:
        return 1 if self.probing else self.max_inflight

    def pump(self) -> None:
        """Start sends for ready batches, up to the in-flight limit, unless sends are paused."""
        ready = self.ready
        refused = self.refused
        if refused:
            # A refused group whose pause is over probes first.
            ready.extendleft(reversed(refused.probes(time.monotonic())))
        if not ready or time.monotonic() < self.blocked_until:
            return
        while ready and len(self.flying) < self.limit():
            batch = ready.popleft()
            if refused:
                kept = self._keep_back(batch)
                if kept is None:
                    continue
                batch = kept
            self.flying.append(batch)
            self.books.counts["requests"] += 1
            batch.started = time.monotonic()
            if self.senders < len(self.flying) and not self._start_sender():
                # No thread can start (interpreter shutdown): send from this thread.
                self.on_done(Done(batch, self._post(self.inline, batch)))
                continue
            self.jobs.put(batch)

    def _keep_back(self, batch: Batch) -> Batch | None:
        """What of ``batch`` may go now: the groups the collector refuses wait (see
        :class:`Refusals`), unless this batch is their probe."""
        groups = self.refused.groups
        stay: list[tuple[bytes, list[bytes]]] = []
        rest: list[tuple[bytes, list[bytes]]] = []
        for part in batch.parts:
            refusal = groups.get(part[0])
            (stay if refusal is not None and refusal.probe is not batch else rest).append(part)
        if not stay:
            return batch
        if len(batch.parts) == 1:
            groups[stay[0][0]].held.append(batch)  # the same body, its Idempotency-Key kept
            return None
        pieces = self._rebatch(batch, [[part] for part in stay] + ([rest] if rest else []))
        going = pieces.pop() if rest else None
        for piece in pieces:
            groups[piece.parts[0][0]].held.append(piece)
        return going

    def _rebatch(self, batch: Batch, pieces: list[list[tuple[bytes, list[bytes]]]]) -> list[Batch]:
        """``batch`` as one batch per piece (its parts, regrouped), held in its place: each
        keeps its sequence number (flush order) and its attempts so far."""
        self.books.release(batch)
        batches = [Batch(piece, batch.seq, batch.attempt) for piece in pieces]
        for piece in batches:
            self.books.hold(piece)
        return batches

    def _start_sender(self) -> bool:
        thread = threading.Thread(
            target=self._send_loop, name=f"alf-analytics-sender:{self.shown_url}", daemon=True
        )
        try:
            thread.start()
        except RuntimeError:  # "can't create new thread at interpreter shutdown"
            return False
        self.senders += 1
        return True

    def stop(self) -> None:
        """Let every sender thread end, and close this thread's own transport."""
        for _ in range(self.senders):
            self.jobs.put(None)
        self.senders = 0
        _close(self.inline)

    def _send_loop(self) -> None:
        """A sender thread: POST each batch handed to it, report each outcome to the worker."""
        jobs, queue = self.jobs, self.answers
        line: list[Transport] = []
        batch: Batch | None = None
        try:
            while True:
                batch = jobs.get()
                if batch is None:
                    return
                queue.put(Done(batch, self._post(line, batch)))
                batch = None
        except BaseException as exc:  # the worker thread counts the batch and logs it
            if batch is not None:
                queue.put(Done(batch, None, exc))
        finally:
            _close(line)

    def _post(self, line: list[Transport], batch: Batch) -> Outcome:
        """One attempt for ``batch`` on the transport in ``line`` (made on first use)."""
        try:
            if not line:
                line.append(self._transport_factory())
            return line[0].send(_body(batch.parts), batch.key)
        except Exception as exc:  # a transport must not kill its sender
            return Outcome(0, error=repr(exc))

    def on_done(self, done: Done) -> None:
        batch = done.batch
        try:
            self.flying.remove(batch)
        except ValueError:  # settled already (given up at the shutdown bound)
            return
        outcome = done.outcome
        if self.refused:
            self.refused.answered(batch)
        if outcome is None:
            # A sender died of a BaseException in the middle of this batch.
            self.senders = max(0, self.senders - 1)
            self.books.release(batch)
            self.books.crashed(done.crash or RuntimeError("sender crashed"), batch.count)
            return
        if self.log.debug_on:
            self.log.debug(
                "batch %s: %d entries, %d bytes -> %s in %.0f ms %s",
                batch.key[:8],
                batch.count,
                sum(len(item) for _, items in batch.parts for item in items),
                outcome.status or outcome.error,
                (time.monotonic() - batch.started) * 1000,
                self.log.errors(outcome),
            )
        status = outcome.status
        if 200 <= status < 300:
            self._delivered(batch, outcome)
            return
        if 300 <= status < 400:
            # Redirects are not followed (a POST body is not re-sent to wherever an answer
            # points): a retry would be redirected again, so say where collector_url should be.
            self.books.settle(batch, "rejected")
            self.log.warn(
                f"http{status}",
                "collector answered %d (Location: %s): redirects are not followed, set "
                "collector_url to the collector's base URL; %d entries dropped",
                status,
                _shown_location(outcome.location),
                batch.count,
            )
            return
        self.streak_400 = self.streak_400 + 1 if status == 400 else 0
        if status == 413 or (status == 400 and self.streak_400 < MAX_400_STREAK):
            if batch.count > 1:
                # Halve it (keeping each entry with its group) and try each half once: a 413
                # until they fit, a 400 until only the entries the collector objects to remain.
                self.books.counts["retried"] += batch.count
                self.ready.extendleft(reversed(self._rebatch(batch, _split(batch.parts))))
                return
            if status == 413:
                self.books.settle(batch, "too_large")
                self.log.warn("413", "collector refused an entry as too large (413); dropped")
                return
        if status in (401, 403):
            self._refused_credentials(batch, outcome)
            return
        if 400 <= status < 500 and status not in (408, 429):
            self.books.settle(batch, "rejected")
            self.log.warn(
                f"http{status}",
                "collector rejected a batch of %d entries with %d %s; dropped",
                batch.count,
                status,
                self.log.errors(outcome),
            )
            return
        self._failed(batch, outcome)

    def _refused_credentials(self, batch: Batch, outcome: Outcome) -> None:
        """401/403: the token (or the URL's credentials) will not work any better in a
        second. The sends of its group pause for ``AUTH_PAUSE`` (other groups' go on), then
        this batch itself finds out (PITFALLS #44); it is kept for up to ``retries`` such
        probes, so a token that an operator adds to the collector meanwhile costs no entry."""
        status = outcome.status
        if len(batch.parts) > 1:
            # Several groups in one request, refused together: each finds out on its own
            # which the collector refuses (ours answers 207 when only some are).
            self.books.counts["retried"] += batch.count
            self.ready.extendleft(reversed(self._rebatch(batch, [[part] for part in batch.parts])))
            return
        prefix = batch.parts[0][0]
        refusal = self.refused.pause(prefix, time.monotonic() + AUTH_PAUSE)
        self.paused_by = "the collector refused our credentials"
        batch.attempt += 1
        shown = mask_token(_token_of(prefix))
        if "***@" in self.shown_url:  # mask_url's mark of a URL's userinfo
            shown += " (or collector_url's user and password)"  # sent as Basic auth
        if batch.attempt > self.retries:
            # Refused every time it probed: so is what its group kept back meanwhile (the
            # next batch of the group probes again after the pause).
            dropped = [batch, *refusal.held]
            refusal.held = []
            for settled in dropped:
                self.books.settle(settled, "rejected")
            self.log.warn(
                f"http{status}",
                "collector refused our credentials for service token %s (%d %s) %d times; "
                "%d entries dropped",
                shown,
                status,
                self.log.errors(outcome),
                batch.attempt,
                sum(settled.count for settled in dropped),
            )
            return
        self.log.warn(
            f"auth:{shown}",
            "collector refused our credentials for service token %s (%d %s): its sends pause "
            "for %.0f s, then the refused batch is tried again (entries wait, bounded by "
            "queue_size and max_queue_bytes; other tokens' entries keep going)",
            shown,
            status,
            self.log.errors(outcome),
            AUTH_PAUSE,
        )
        self.books.counts["retried"] += batch.count
        refusal.held.insert(0, batch)

    def _delivered(self, batch: Batch, outcome: Outcome) -> None:
        if self.refused:
            # Accepted again (a token added meanwhile): what its group kept back goes now.
            self.ready.extendleft(reversed(self.refused.accepted(batch)))
        refused = _refused_entries(batch, outcome) if outcome.status == 207 else 0
        self.books.counts["sent"] += batch.count - refused
        self.books.counts["batches"] += 1
        self.books.release(batch)
        if refused:
            self.books.drops["rejected"] += refused
            self.books.note_loss(batch, refused)
            self.log.warn(
                "207",
                "collector refused %d of %d entries (207): %s",
                refused,
                batch.count,
                self.log.errors(outcome),
            )
        elif outcome.status == 207:
            self.log.warn("207", "collector accepted part of a batch: %s", self.log.errors(outcome))
        self.failures = 0
        self.streak_400 = 0
        self.blocked_until = 0.0
        self.probing = False
        self.paused_by = ""
        if self.outage:
            self.outage = False
            logger.warning("alf_analytics (%s): delivery recovered", self.shown_url)

    def _failed(self, batch: Batch, outcome: Outcome) -> None:
        """A retryable failure: hold the batch for a later attempt, never retry here.

        Other batches keep going out meanwhile, so an isolated 5xx costs no throughput. Two
        failures in a row mean the collector is down (or a 429 asked us to wait): then every
        send pauses, with backoff, and the next attempt is a probe.
        """
        if outcome.maybe_delivered:
            batch.maybe = True
        status = outcome.status
        self.failures += 1
        # Not only at the first failure: one the rate limit held back is said at a later one.
        if not self.outage and (status == 0 or status >= 500):
            self.outage = (
                self.log.warn(
                    "down",
                    "collector unreachable or failing (%s); retrying with backoff, entries wait "
                    "(bounded by queue_size and max_queue_bytes)",
                    outcome.error or f"HTTP {status}",
                )
                or self.outage
            )
        batch.attempt += 1
        if batch.attempt > self.retries:
            reason = self.books.settle(batch, "retries_exhausted")
            self.log.warn(
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
        if self.failures >= 2 or outcome.retry_after is not None:
            pause = backoff(self.failures, self.retry_backoff, outcome.retry_after)
            self.blocked_until = max(self.blocked_until, now + pause)
            self.probing = True
            self.paused_by = "the collector is failing"
            batch.due = max(batch.due, self.blocked_until)
        self.books.counts["retried"] += batch.count
        self.retry.append(batch)

    def retry_due(self, now: float) -> None:
        """Batches whose retry time has come go first in line, oldest first."""
        if not self.retry:
            return
        due = [batch for batch in self.retry if batch.due <= now]
        if due:
            for batch in due:
                self.retry.remove(batch)
            due.sort(key=lambda b: b.seq)
            self.ready.extendleft(reversed(due))

    def give_up_late(self, deadline: float, now: float) -> None:
        """close() is under way: a batch that cannot be sent before its bound never will.

        Batches whose next attempt falls past the bound (sends paused after a 401/403 or by a
        failing collector's backoff) are not given up untried: one batch probes at once, and
        only if it fails too is the rest dropped.
        """
        paused = (
            self.blocked_until > deadline
            or any(b.due > deadline for b in self.retry)
            or self.refused.past(deadline)
        )
        if paused and now < deadline and self.probed_for != deadline:
            self.probed_for = deadline
            self.blocked_until = now
            self.probing = True
            for batch in self.retry:
                batch.due = min(batch.due, now)
            self.retry_due(now)
            self.refused.lift(now)
            return
        late = [
            batch
            for batch in self.retry
            if now >= deadline or max(batch.due, self.blocked_until) > deadline
        ]
        if now >= deadline or self.blocked_until > deadline:
            late += self.ready
            self.ready.clear()
        for batch in late:
            if batch in self.retry:
                self.retry.remove(batch)
        refused_late = self.refused.late(deadline, now)
        late += refused_late
        count = 0
        for batch in late:
            self.books.settle(batch, "shutdown")
            count += batch.count
        if count:
            if now >= deadline:
                why = "the shutdown bound was reached"
            else:
                why = "the next attempt falls past the shutdown bound"
                paused_by = self.paused_by
                if refused_late:
                    paused_by = "the collector refused our credentials"
                if paused_by:
                    why = f"{paused_by}, and {why}"
            self.log.warn("shutdown", "shutdown: %d queued entries dropped (%s)", count, why)


def url_passwords(url: str) -> tuple[str, ...]:
    """The password in ``url``, as written and percent-decoded (for :meth:`Log.errors`)."""
    try:
        password = urlsplit(url).password
    except ValueError:
        return ()
    # Shorter than 4 characters, masking it would garble every line and hide next to nothing.
    found = {value for value in (password or "", unquote(password or "")) if len(value) >= 4}
    return tuple(sorted(found, key=len, reverse=True))


def _shown_location(location: str | None) -> str:
    """A redirect's target for the log: credentials masked, a query (maybe a key) left out."""
    if not location:
        return "none"
    base, query, _ = location.partition("?")
    return mask_url(base) + ("?..." if query else "")


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


def moved(old: Any, new: Any) -> Any:
    """``new``, holding what ``old`` held (nothing takes from ``old`` meanwhile)."""
    while True:
        try:
            new.put(old.get_nowait())
        except Empty:
            return new


def _token_of(prefix: bytes) -> str:
    """The service token in a group's ALF prefix (for a masked log line)."""
    try:
        token = json.loads(prefix + _SUFFIX)["serviceToken"]
    except Exception:  # not ours to fail on
        return ""
    return token if isinstance(token, str) else ""


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


def _refused_entries(batch: Batch, outcome: Outcome) -> int:
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
