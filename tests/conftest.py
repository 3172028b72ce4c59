"""Shared fixtures: each lives in a tests/support module and is re-exported here."""

from tests.support.hub import hub  # noqa: F401
from tests.support.zoo import bv_cache_dir, zoo  # noqa: F401
