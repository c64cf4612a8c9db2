"""Top functions of a py-spy profile, by own time and inclusive time.

    .venv/bin/python -m tests.perf.topself FILE [--top 10]

FILE is what `py-spy record --format raw` writes (`tests.perf.fleet --profile DIR`
makes one per N): one collapsed stack per line, `frame;frame;...;leaf COUNT`, each
frame `function (file:line)`. Own time counts the samples whose leaf is the function
(line numbers merged); inclusive time the samples with the function anywhere in the
stack. Percentages are of all samples (py-spy leaves idle threads out).
"""

from __future__ import annotations

import argparse
import re
from collections import Counter
from pathlib import Path

FRAME = re.compile(r"^(?P<function>.*) \((?P<file>[^()]*?)(?::\d+)?\)$")
PLUMBING = ("typer/", "<string>", "threading.py", "coordinator/cli/main.py",
            "asyncio/runners.py", "asyncio/base_events.py", "asyncio/events.py")  # fmt: skip
"""Frames every stack passes through: left out of the inclusive list."""


def _frames(stack: str) -> list[tuple[str, str]]:
    found = []
    for frame in stack.split(";"):
        match = FRAME.match(frame.strip())
        if match:
            found.append((match["function"], _short(match["file"])))
    return found


def _short(path: str) -> str:
    """A file path from the package or library root down (site-packages/, /lib/python3.X/)."""
    for marker in ("site-packages/", "/lib/python3."):
        if marker in path:
            tail = path.split(marker, 1)[1]
            return tail.split("/", 1)[1] if marker.startswith("/lib") else tail
    for package in ("coordinator/", "shared/", "agent/"):
        if f"/{package}" in path:
            return package + path.rsplit(f"/{package}", 1)[1]
    return path


def read(path: Path) -> tuple[Counter[tuple[str, str]], Counter[tuple[str, str]], int]:
    own: Counter[tuple[str, str]] = Counter()
    inclusive: Counter[tuple[str, str]] = Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        frames = _frames(stack)
        if not frames:
            continue
        total += int(count)
        own[frames[-1]] += int(count)
        for frame in set(frames):
            inclusive[frame] += int(count)
    return own, inclusive, total


def report(path: Path, top: int) -> str:
    own, inclusive, total = read(path)
    lines = [f"{path}: {total} samples", "", f"top {top} by own time:"]
    for (function, file), count in own.most_common(top):
        lines.append(f"{100 * count / total:6.1f} %  {function}  ({file})")
    lines += ["", f"top {top} by inclusive time (event loop and CLI plumbing left out):"]
    shown = [(key, n) for key, n in inclusive.most_common() if not key[1].startswith(PLUMBING)]
    for (function, file), count in shown[:top]:
        lines.append(f"{100 * count / total:6.1f} %  {function}  ({file})")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("file", type=Path)
    parser.add_argument("--top", type=int, default=10)
    args = parser.parse_args()
    print(report(args.file, args.top))


if __name__ == "__main__":
    main()
