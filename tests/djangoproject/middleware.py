"""Third-party-style middleware used next to ours in the tests."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from asgiref.sync import iscoroutinefunction, markcoroutinefunction
from django.http import HttpRequest, HttpResponse


class AsyncOnlyMiddleware:
    """An async-only middleware (PITFALLS #26): breaks if handed a sync ``get_response``."""

    sync_capable = False
    async_capable = True

    def __init__(self, get_response: Callable[[HttpRequest], Awaitable[HttpResponse]]) -> None:
        if not iscoroutinefunction(get_response):
            raise TypeError("AsyncOnlyMiddleware needs an async get_response")
        self.get_response = get_response
        markcoroutinefunction(self)

    async def __call__(self, request: HttpRequest) -> HttpResponse:
        response = await self.get_response(request)
        response["X-Async-Only"] = "seen"
        return response
