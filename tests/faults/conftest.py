"""The fault tier reuses the end-to-end fleet."""

from tests.e2e.conftest import fleet, three_hosts

__all__ = ["fleet", "three_hosts"]
