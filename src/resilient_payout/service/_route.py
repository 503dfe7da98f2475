"""The routes' own class: our errors become problem+json in the route itself, so the answers are
the same in a host app that never installed our exception handlers."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

from fastapi import Request, Response
from fastapi.routing import APIRoute

from .problems import problem_for

__all__ = ["ProblemRoute", "answered"]


async def answered(handler: Callable[[Request], Awaitable[Response]], request: Request) -> Response:
    """``handler``'s answer, or the problem+json answer of the error it raised; anything
    :func:`~resilient_payout.service.problems.problem_for` does not know (a bug) is re-raised."""
    try:
        return await handler(request)
    except Exception as exc:
        response = await problem_for(request, exc)
        if response is None:
            raise
        return response


class ProblemRoute(APIRoute):
    """An ``APIRoute`` answering library errors, route problems, HTTP and validation errors as
    RFC 9457 problems (:func:`~resilient_payout.service.problems.problem_for`).

    Anything else (a bug) is re-raised for the host app's own error handling and reporting;
    :func:`~resilient_payout.service.create_app` renders it as a bare 500 problem.
    """

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def handle(request: Request) -> Response:
            return await answered(handler, request)

        return handle
