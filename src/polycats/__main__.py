"""``python -m polycats``: the same command line as ``polycats`` (the experiment runner's workers use it)."""

from polycats.cli import main

main()
