"""What the SQL and Redis backends share: the stored form of a record and an outbox entry, and
the mapping of driver exceptions onto :class:`~resilient_payout.StorageUnavailable` ("not
now") and :class:`~resilient_payout.StorageError`.

A payout is stored as a compact JSON document *without* its version: the backend's own version
column (or hash field) is authoritative, because claims bump it without rewriting the document.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from typing import Any

from .._errors import StorageError, StorageUnavailable
from .._model import OutboxEntry, Payout, PayoutStatus

__all__ = ["decode_outbox", "decode_payout", "encode_payout", "outbox_values", "translated"]


def encode_payout(payout: Payout) -> str:
    """The stored document: every field but the version."""
    d = payout.to_dict()
    del d["version"]
    return json.dumps(d, separators=(",", ":"))


def decode_payout(version: Any, doc: str | bytes) -> Payout:
    """The payout stored as ``doc``, at ``version`` (an int, or Redis's string of one)."""
    d = json.loads(doc)
    d["version"] = int(version)
    return Payout.from_dict(d)


def outbox_values(entry: OutboxEntry) -> tuple[Any, ...]:
    """An entry's stored values after its payout id, in column order (SQL backends)."""
    return (
        entry.status.value,
        entry.created_at,
        entry.next_attempt_at,
        entry.attempts,
        entry.delivered_at,
        entry.last_error,
        entry.dead_at,
    )


def decode_outbox(
    payout_id: str,
    status: Any,
    created_at: Any,
    next_attempt_at: Any,
    attempts: Any,
    delivered_at: Any,
    last_error: Any,
    dead_at: Any,
) -> OutboxEntry:
    """An entry from its stored values: SQL columns, or Redis hash fields (numbers as strings)."""
    return OutboxEntry(
        payout_id=payout_id,
        status=PayoutStatus(status),
        created_at=float(created_at),
        next_attempt_at=float(next_attempt_at),
        attempts=int(attempts),
        delivered_at=None if delivered_at is None else float(delivered_at),
        last_error=last_error,
        dead_at=None if dead_at is None else float(dead_at),
    )


@contextlib.contextmanager
def translated(
    driver: str,
    unavailable: tuple[type[BaseException], ...],
    errors: tuple[type[BaseException], ...],
    *,
    fatal: tuple[type[BaseException], ...] = (),
) -> Iterator[None]:
    """Re-raise ``unavailable`` as StorageUnavailable and other ``errors`` as StorageError,
    each named ``"<driver>: <type>: <message>"``. ``fatal`` (checked first, since a driver may
    file them under its connection errors) are configuration errors that retrying won't help:
    StorageError ``"<driver>: <message>"``."""
    try:
        yield
    except StorageError:
        raise  # ours, raised inside the block: already translated
    except fatal as exc:
        raise StorageError(f"{driver}: {exc}") from exc
    except unavailable as exc:
        raise StorageUnavailable(f"{driver}: {type(exc).__name__}: {exc}") from exc
    except errors as exc:
        raise StorageError(f"{driver}: {type(exc).__name__}: {exc}") from exc
