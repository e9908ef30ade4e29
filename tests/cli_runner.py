"""Run the ``polycats`` command line in-process, through ``polycats.cli.main`` (what the console
script runs), and check its one-line errors: shared by the CLI tests."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path
from unittest import mock


def run_cli(args: list[str] | tuple[str, ...], cwd: Path, stdin: bytes = b"",
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """``polycats ARGS`` run from ``cwd`` with ``stdin`` and extra environment ``env``."""
    from polycats.cli import main

    out, err = io.StringIO(), io.StringIO()
    old_cwd = os.getcwd()
    os.chdir(cwd)
    try:
        with mock.patch.object(sys, "argv", ["polycats", *args]), \
                mock.patch.object(sys, "stdin", io.TextIOWrapper(io.BytesIO(stdin), encoding="utf-8")), \
                mock.patch.dict(os.environ, env or {}), \
                redirect_stdout(out), redirect_stderr(err):
            try:
                main()
                code = 0
            except SystemExit as exit_:
                code = exit_.code if isinstance(exit_.code, int) else int(exit_.code is not None)
    finally:
        os.chdir(old_cwd)
    return subprocess.CompletedProcess(list(args), code, out.getvalue().encode(), err.getvalue().encode())


def text(process: subprocess.CompletedProcess) -> tuple[str, str]:
    return process.stdout.decode("utf-8", "replace"), process.stderr.decode("utf-8", "replace")


def assert_one_line_error(process: subprocess.CompletedProcess, *fragments: str) -> str:
    """Exit code 2, no traceback, one ``error:`` line on stderr holding every fragment."""
    out, err = text(process)
    assert process.returncode == 2, (process.returncode, out, err)
    assert "Traceback" not in out + err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]
