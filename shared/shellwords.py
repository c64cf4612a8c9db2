"""Where a `${...}` variable stands in a shell command (`run`, hooks, `health.exec`).

The agent substitutes variables into those commands shell-quoted (`shlex.quote`), which
is safe only where the variable stands as a plain word: inside quotes, `$(...)` or
backticks the quoting is undone (`"x=${meta.k}"` with a label `$(reboot)` would run
it). `misplaced` names every variable that is not in a plain word; the spec validator
refuses such a spec at register time (exit 2) and the agent refuses to render one
(a NO vote), so a label value can never inject a command. Pure string scanning.
"""

from __future__ import annotations

_OPENERS = {"'": "'", '"': '"', "`": "`"}


def misplaced(command: str) -> list[str]:
    """The `${...}` names in `command` that stand inside quotes, `$(...)` or backticks."""
    found: list[str] = []
    stack: list[str] = []  # the closers of the open contexts, innermost last
    i = 0
    while i < len(command):
        closer = stack[-1] if stack else None
        if closer != "'" and command[i] == "\\":  # nothing escapes in single quotes
            i += 2
            continue
        if command.startswith("${", i):
            end = command.find("}", i)
            end = len(command) if end < 0 else end
            if stack:
                found.append(command[i + 2 : end].strip())
            i = end + 1
            continue
        i += _step(command, i, stack, closer)
    return found


def _step(command: str, i: int, stack: list[str], closer: str | None) -> int:
    """Open or close a context at `i`; how far to move on."""
    char = command[i]
    if closer == "'":  # nothing opens inside single quotes; only ' closes them
        if char == "'":
            stack.pop()
        return 1
    if command.startswith("$(", i):
        stack.append(")")
        return 2
    if char == closer:
        stack.pop()
    elif char in _OPENERS and not (char == "'" and closer == '"'):
        stack.append(_OPENERS[char])
    return 1
