"""storage_from_url refuses an unusable URL with a ConfigurationError, never echoing a password."""

from __future__ import annotations

import pytest

from resilient_payout import ConfigurationError, PayoutError
from resilient_payout.storage import MemoryStorage, storage_from_url


def test_unsupported_scheme_is_a_configuration_error() -> None:
    with pytest.raises(ConfigurationError, match="unsupported storage URL scheme 'mysql'") as info:
        storage_from_url("mysql://user:s3cret@db/x")
    assert isinstance(info.value, ValueError)  # callers catching ValueError still work
    assert isinstance(info.value, PayoutError)
    assert "s3cret" not in str(info.value)


def test_memory_url_still_builds() -> None:
    assert isinstance(storage_from_url("memory://"), MemoryStorage)
