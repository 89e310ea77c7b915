"""Fixtures of the CLI end-to-end tests."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from tests.helpers.cli import CLI


@pytest.fixture
def cli(tmp_path: Path):
    """Run the CLI in ``tmp_path`` with a clean environment; returns CompletedProcess."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("QUOTA_LEDGER_")}
    env["COLUMNS"] = "200"

    def run(
        *args: str, input: str | None = None, extra_env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            [*CLI, *args],
            input=input,
            capture_output=True,
            text=True,
            cwd=tmp_path,
            env={**env, **(extra_env or {})},
            timeout=120,
        )
        assert "Traceback" not in proc.stderr, proc.stderr
        return proc

    return run
