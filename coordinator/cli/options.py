"""Flags and argument parsing shared by several `lockstep` commands (deploys.py,
queries.py, control.py, main.py)."""

from __future__ import annotations

from typing import Annotated

import typer

from shared.errors import UserError

Json = Annotated[bool, typer.Option("--json", help="Print one JSON document on stdout.")]
Wait = Annotated[bool, typer.Option("--wait", help="Follow the deployment to its end.")]


def pair(text: str, where: str) -> tuple[str, str]:
    """`KEY=VALUE` as (key, value), or a `UserError` naming `where`."""
    key, sep, value = text.partition("=")
    if not sep or not key or not value:
        raise UserError(where, f"{text!r} is not of the form KEY=VALUE")
    return key.strip(), value.strip()
