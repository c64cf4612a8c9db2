"""The agent's durable state: one SQLite file (WAL, synchronous=FULL, a statement a write).

The only agent package that imports aiosqlite. `tables.Store` opens the file
(`base.connect`) and holds the state tables (transactions, services, and from
`switches` crash loops and `current` switches);
`commands.CommandLog` (`store.commands`) is the durable command log the service
records every command in before acking it. The agent imports both from here.
"""

from agent.store.commands import CommandLog, CommandRecord
from agent.store.switches import Switch, SwitchKind
from agent.store.tables import ServiceRow, Store, Txn, TxnState

__all__ = [
    "CommandLog", "CommandRecord", "ServiceRow", "Store", "Switch", "SwitchKind", "Txn",
    "TxnState",
]  # fmt: skip
