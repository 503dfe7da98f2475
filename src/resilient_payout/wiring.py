"""Framework-neutral wiring: the running :class:`~resilient_payout.PayoutClient` built from
:class:`~resilient_payout.settings.ServiceSettings` (``RP_*``), for a web app, a worker or the CLI.

No web framework is imported here: a plain asyncio worker needs only this module::

    async with open_client(ServiceSettings.from_env()) as client:
        await client.submit({"id": "order-1", "amount": 100})
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from ._client import PayoutClient
from ._errors import StorageError, StorageUnavailable
from ._policy import Policy
from ._replay import replay_store_for
from .notify import HttpNotifier, Notifier
from .partner import HttpPartner, Partner
from .settings import ServiceSettings
from .storage import Storage, storage_from_url
from .webhooks import InMemoryReplayStore, ReplayStore

__all__ = ["DEFAULT", "ClientFactory", "describe_storage", "open_client", "open_storage"]

ClientFactory = Callable[[ServiceSettings], AbstractAsyncContextManager[PayoutClient]]
"""Builds the running client for an app; a bare ``PayoutClient`` (itself an async context
manager) will do, e.g. ``lambda s: PayoutClient(storage=MemoryStorage(), ...)``."""


class _Default:
    def __repr__(self) -> str:
        return "DEFAULT"


DEFAULT: Any = _Default()
"""``open_client(notifier=DEFAULT)``: the one the settings describe (``HttpNotifier``)."""


def describe_storage(url: str) -> str:
    """What a storage URL points at, fit for messages: the file of an SQLite URL, the scheme,
    host, port and database of a server URL (never a user, password or query option)."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme == "sqlite":
        return f"SQLite file {Path(parts.path[1:]).absolute()}"
    if scheme == "memory":
        return "memory://"
    try:
        port = f":{parts.port}" if parts.port else ""
    except ValueError:
        port = ""
    return f"{scheme}://{parts.hostname or ''}{port}{parts.path}"


def _sqlite_hint(url: str) -> str | None:
    """Why an SQLite file cannot be opened, when the file system says so plainly."""
    db = Path(urlsplit(url).path[1:]).absolute()
    parent = db.parent
    if not parent.exists():
        return f"the directory {parent} does not exist"
    if not parent.is_dir():
        return f"{parent} is not a directory"
    if db.exists() and not os.access(db, os.W_OK):
        return f"{db} is not writable"
    if not db.exists() and not os.access(parent, os.W_OK):
        return f"the directory {parent} is not writable"
    return None


async def open_storage(storage: Storage, url: str | None = None) -> Storage:
    """``storage`` opened; if it cannot open, a :class:`StorageUnavailable` in one sentence
    naming what ``url`` points at (:func:`describe_storage`; without a URL, the backend's
    ``repr``) and why."""
    try:
        await storage.open()
    except (StorageError, OSError) as exc:
        await _close_quietly(storage)
        what = describe_storage(url) if url else repr(storage)
        why = _sqlite_hint(url) if url and url.lower().startswith("sqlite:") else None
        raise StorageUnavailable(f"cannot open the storage ({what}): {why or exc}") from exc
    return storage


async def _close_quietly(storage: Storage) -> None:
    with contextlib.suppress(StorageError, OSError):  # it never opened: nothing to release
        await storage.close()


def _budget(settings: ServiceSettings, policy: Policy) -> AbstractAsyncContextManager[Any]:
    """The shared Redis check budget (closed on exit), or None for the client's local one."""
    if not settings.budget_url:
        return _nothing()
    from .reconcile.redis import RedisCheckBudget

    # The policy's rate is already scaled: every instance must agree on it, as on the key.
    return RedisCheckBudget(
        settings.budget_url,
        rate=policy.check_rate,
        burst=policy.check_burst,
        key=settings.budget_key,
    )


@asynccontextmanager
async def _nothing() -> AsyncIterator[None]:
    yield None


@asynccontextmanager
async def _replay_store(url: str) -> AsyncIterator[ReplayStore]:
    """The webhook replay store of every instance on the storage at ``url``: Redis's or
    PostgreSQL's next to it (opened here, closed on exit), else this process's memory."""
    store = replay_store_for(url)
    if store is None:
        yield InMemoryReplayStore()
        return
    try:
        await store.open()
    except (StorageError, OSError) as exc:
        await store.close()
        what = describe_storage(url)
        raise StorageUnavailable(f"cannot open the webhook replay store ({what}): {exc}") from exc
    try:
        yield store
    finally:
        await store.close()


@asynccontextmanager
async def open_client(
    settings: ServiceSettings | None = None,
    *,
    partner: Partner | None = None,
    notifier: Notifier | None = DEFAULT,
    storage: Storage | None = None,
    **client_options: Any,
) -> AsyncIterator[PayoutClient]:
    """The default :data:`ClientFactory`: storage from the URL (opened first, so that a storage
    that cannot open is one clear :class:`StorageUnavailable`), the HTTP partner and notifier,
    the shared Redis check budget when ``budget_url`` is set, and the webhook replay store (of
    message ids for the settings' verifier and of partner event ids): on the storage's Redis or
    PostgreSQL when ``storage_url`` is one, so every instance refuses a replay, else in memory.

    ``settings`` defaults to :meth:`ServiceSettings.from_env`. ``partner``: your adapter instead
    of ``HttpPartner(settings.partner_url)`` (entered and closed here if it is an async context
    manager); ``notifier``: e.g. a :class:`~resilient_payout.CallbackNotifier`, or None to keep
    outcomes in the outbox; ``storage``: an unopened backend instead of ``storage_url``'s;
    ``client_options`` go to :class:`~resilient_payout.PayoutClient` (``webhook_parser``,
    ``webhook_verifier`` instead of the settings', ``on_conflict``, ``background``...).
    :func:`functools.partial` makes any of these a :data:`ClientFactory`.
    """
    settings = ServiceSettings.from_env() if settings is None else settings
    policy = settings.policy()
    async with AsyncExitStack() as stack:
        backend = storage if storage is not None else storage_from_url(settings.storage_url)
        await open_storage(backend, settings.storage_url if storage is None else None)
        stack.push_async_callback(_close_quietly, backend)  # if the client never starts
        budget = await stack.enter_async_context(_budget(settings, policy))
        replays = None
        if not {"webhook_verifier", "webhook_replays"} <= client_options.keys():
            replays = await stack.enter_async_context(_replay_store(settings.storage_url))
        adapter: Partner
        if partner is None:
            adapter = await stack.enter_async_context(
                HttpPartner(settings.partner_url, policy=policy)
            )
        elif isinstance(partner, AbstractAsyncContextManager):
            adapter = await stack.enter_async_context(partner)
        else:
            adapter = partner
        if notifier is DEFAULT:
            notifier = await stack.enter_async_context(
                HttpNotifier(
                    settings.push_url, body=settings.push_body, timeout=policy.notify_timeout
                )
            )
        options = {"webhook_verifier": settings.webhook_verifier(replays), "policy": policy,
                   "budget": budget, "instance_id": settings.instance_id,
                   "webhook_replays": replays, **client_options}  # fmt: skip
        client = PayoutClient(
            storage=backend,
            partner=adapter,
            webhook_url=settings.webhook_url,
            notifier=notifier,
            **options,
        )
        async with client:
            yield client
