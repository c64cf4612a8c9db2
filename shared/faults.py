"""Named protocol points where fault tests crash a process on purpose.

`point("coordinator.decided")` kills the process with SIGKILL when the environment
variable LOCKSTEP_FAULT_POINT names that point, and does nothing otherwise. Fault
tests start a process with the variable set, let it die exactly there, and start it
again without it, so every crash lands on a known step of the protocol rather than on
a timing guess.

Points: coordinator.prepare_sent, coordinator.decided, coordinator.mid_commit,
agent.voted, agent.switched.
"""

from __future__ import annotations

import os
import signal

VARIABLE = "LOCKSTEP_FAULT_POINT"


def point(name: str) -> None:
    """Die here if the fault tests asked for it."""
    if os.environ.get(VARIABLE) == name:
        os.kill(os.getpid(), signal.SIGKILL)
