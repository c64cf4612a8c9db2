"""The broker boundary: the only package that imports aio-pika.

`Broker` connects (robustly), declares the topology of `shared.topology`, publishes
envelopes with publisher confirms and persistent delivery (signed, when it was given a
`Signer`, and stamped with the connection's user as `user_id`, which the broker
checks), consumes with manual acks, and makes request/reply calls for the CLI.

One place decides what happens to a delivery: `consume.Consumer._handle` (its module
docstring lists the outcomes). Library errors become `BrokerUnavailable` at this
boundary. The coordinator, the agents, the CLI and the tests import from here:

    from shared.transport import Broker, Delivery, Handler, Unroutable
"""

from shared.transport.broker import Broker
from shared.transport.connection import Unroutable
from shared.transport.consume import Delivery, Handler

__all__ = ["Broker", "Delivery", "Handler", "Unroutable"]
