"""``set_consumer()``: name the caller of the current request from inside the app.

Each recorded request gets a fresh :class:`ConsumerHolder`, put in a context variable by the
middleware before the app runs. Context variables are copied into threads
(``run_in_threadpool``, ``sync_to_async``) and tasks the request starts, and every copy
refers to the same holder object, so an id set anywhere in the request's code reaches its
entry; concurrent requests never see each other's holder.
"""

from __future__ import annotations

from contextvars import ContextVar, Token

from ._record import log_internal_error

__all__ = ["ConsumerHolder", "set_consumer"]


class ConsumerHolder:
    """The consumer id of one request (``None`` until set)."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value: str | None = None


_current: ContextVar[ConsumerHolder | None] = ContextVar("alf_analytics_consumer", default=None)


def set_consumer(consumer_id: str | None) -> bool:
    """Record ``consumer_id`` as the caller of the request being served.

    Call it from a view, a dependency or an auth hook, once the app knows the user. It wins
    over the ``identify`` option. Returns ``False`` (and does nothing) outside a request that
    is being recorded: a skipped or sampled-out request, a background job, or recording off.
    """
    if consumer_id is not None and not isinstance(consumer_id, str):
        raise TypeError(
            f"alf_analytics.set_consumer() takes a str or None, got {type(consumer_id).__name__}"
        )
    holder = _current.get()
    if holder is None:
        return False
    holder.value = consumer_id
    return True


def enter() -> tuple[ConsumerHolder, Token[ConsumerHolder | None]]:
    """Give the request about to run its own holder; :func:`leave` with the token after."""
    holder = ConsumerHolder()
    return holder, _current.set(holder)


def resume(holder: ConsumerHolder) -> Token[ConsumerHolder | None] | None:
    """Give back a request's holder to code that runs after the app returned (a WSGI server
    iterating a streamed body); :func:`leave_quietly` with the token after. Never raises: a
    failure is logged (PITFALLS #20) and None returned."""
    try:
        return _current.set(holder)
    except Exception:
        log_internal_error("capture")
        return None


def leave(token: Token[ConsumerHolder | None]) -> None:
    try:
        _current.reset(token)
    except ValueError:  # reset in another context (a server that switched contexts): unset
        _current.set(None)


def leave_quietly(token: Token[ConsumerHolder | None]) -> None:
    """:func:`leave`, for the request path: a failure is logged (PITFALLS #20), never raised,
    and the holder is dropped all the same, so that the thread's next request (or a skipped
    one) never finds a finished request's holder."""
    try:
        leave(token)
    except Exception:
        log_internal_error("capture")
        _current.set(None)
