"""The coordinators' lease: when to renew it, when to look for it, how long it counts.

Pure; `coordinator.leadership` runs the loop. One coordinator is active: the one
holding the lease in the shared store. It renews the lease `RENEWALS` times per
`lease_ttl`; a standby looks for an expired lease `LOOKS` times per `lease_ttl`, so it
takes over at most `lease_ttl x (1 + 1/LOOKS)` after the active one's last renewal.

The holder trusts its lease only for `TRUST` of the ttl after it *sent* the renewal
that succeeded (the store counted the ttl from later, when it ran the update), so a
holder whose clock runs a little fast, or that was stalled (SIGSTOP, swap) past its
lease, stops publishing before a standby can have taken over; it publishes again only
once a renewal confirms it still holds the lease at the same epoch.
"""

from __future__ import annotations

RENEWALS = 3
"""Renewals per lease_ttl: two may fail (a slow store, a busy loop) before it expires."""
LOOKS = 6
"""A standby's looks per lease_ttl."""
TRUST = 0.8
"""The share of lease_ttl the holder counts on after sending a renewal."""


def renew_every(ttl: float) -> float:
    return ttl / RENEWALS


def look_every(ttl: float) -> float:
    return ttl / LOOKS


def trusted_until(sent_at: float, ttl: float) -> float:
    """Until when (the holder's monotonic clock) a renewal sent at `sent_at` that
    succeeded lets the holder act."""
    return sent_at + TRUST * ttl
