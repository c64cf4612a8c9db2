"""Where envelopes are signed and checked.

Real Ed25519 signing arrives with its own issue (SPEC 7). Until then nothing claims
to be signed: `sign` leaves `sig` empty and `verify` refuses any envelope that carries
a signature, since no key exists here that could check it. Every consumer calls
`verify` right after decoding, so the check has exactly one home.
"""

from __future__ import annotations

from shared.errors import ProtocolError
from shared.messages import Envelope


def sign(envelope: Envelope) -> Envelope:
    """`envelope` as it goes on the wire (unsigned until keys exist)."""
    return envelope


def verify(envelope: Envelope) -> None:
    """Raise `ProtocolError` unless `envelope` may be acted on."""
    if envelope.sig is not None:
        raise ProtocolError("sig: signed envelopes are not accepted: no signing keys exist")
