"""The `kitfs` verbs, one module each (named for its verb, holding its `COMMAND`).

cli.py reads the table of `Command`s (command.py) and builds the parser
from it; what the verbs share (network options, opening a reference from
kit's local storage or a registry, running trio) is in common.py.
"""
