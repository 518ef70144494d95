"""What cli.py needs to know about one verb: its name, its help and two functions.

`kitfs --help`, and both interpreters of `kitfs mount` (the command and its
daemon), import every verb module to build the parser. So a verb module
imports at top level only what declaring its arguments needs; what `run`
needs (trio, httpx, the engine, the cache) is imported inside `run`, and
start-up stays as quick as a parser. Even `typing` and `dataclasses` cost
7 ms of a 45 ms `kitfs --help`: verb modules test `TYPE_CHECKING = False`
(mypy reads it as typing's) and `Command` is a plain class.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable


class Command:
    """One verb. Fields are read-only by convention (a frozen dataclass costs an import)."""

    __slots__ = ("add_arguments", "description", "help", "name", "run")

    def __init__(
        self,
        *,
        name: str,
        help: str,
        description: str,
        add_arguments: Callable[[argparse.ArgumentParser], None],
        run: Callable[[argparse.Namespace], int],
    ) -> None:
        self.name = name
        #: One line in `kitfs --help`.
        self.help = help
        #: What `kitfs NAME --help` prints above the options: what it does, with examples.
        self.description = description
        self.add_arguments = add_arguments
        #: Runs the verb and returns its exit status; failures are raised as KitfsError
        #: and turned into one line by cli.main.
        self.run = run

    def __repr__(self) -> str:
        return f"Command({self.name!r})"
