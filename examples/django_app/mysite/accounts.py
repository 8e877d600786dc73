"""Who is calling: the account behind the request's API key, told to alf-analytics.

A stand-in for an app's own authentication. Where the app learns who the caller is, it says
so with :func:`alf_analytics.set_consumer`, which wins over the ``identify`` option; the
entry then carries the account as its consumer (the dashboard's Consumers panel, the log's
consumer filter). It records the account name, never the key: the key is a secret (and
``X-Api-Key`` is redacted from every entry by default).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from asgiref.sync import iscoroutinefunction
from django.http import HttpRequest
from django.utils.decorators import sync_and_async_middleware

import alf_analytics

#: The example's API keys and the account each belongs to (``make demo`` sends these).
API_KEYS = {
    "demo-key-acme-1f3a": "acme",
    "demo-key-globex-7c2d": "globex",
    "demo-key-initech-90be": "initech",
    "demo-key-umbrella-44d1": "umbrella",
    "demo-key-hooli-b6e8": "hooli",
}


def _authenticate(request: HttpRequest) -> None:
    account = API_KEYS.get(request.headers.get("X-Api-Key", ""))
    if account is not None:
        alf_analytics.set_consumer(account)


@sync_and_async_middleware
def api_key_account(get_response: Callable[[HttpRequest], Any]) -> Callable[[HttpRequest], Any]:
    """Sync under WSGI, async under ASGI: the async stack stays async (no thread hop)."""
    if iscoroutinefunction(get_response):

        async def async_middleware(request: HttpRequest) -> Any:
            _authenticate(request)
            response: Awaitable[Any] = get_response(request)
            return await response

        return async_middleware

    def middleware(request: HttpRequest) -> Any:
        _authenticate(request)
        return get_response(request)

    return middleware
