"""Real ``quota-ledger`` processes (``worker``, ``beat``, ``publish``, …) on a database and a
broker: each is started in its own process group, and the whole group is terminated (then
killed) when the pipeline stops. The ``pipeline`` fixture (tests/conftest.py) builds one."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ledger.db import upgrade

REPO = Path(__file__).resolve().parents[2]


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen
    log: Path

    def text(self) -> str:
        return self.log.read_text(encoding="utf-8", errors="replace")

    def wait_for_log(self, marker: str, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while marker not in self.text():
            if self.popen.poll() is not None:
                raise AssertionError(
                    f"{self.name} exited ({self.popen.returncode}) before {marker!r}:\n"
                    + self.text()[-4000:]
                )
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"{self.name}: no {marker!r} in {timeout}s:\n{self.text()[-4000:]}"
                )
            time.sleep(0.1)

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM the process group (warm shutdown), SIGKILL what is left after ``timeout``."""
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.popen.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.popen.wait(timeout)
        # The children too, even if the leader is gone.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.popen.pid, signal.SIGKILL)
        if self.popen.poll() is None:
            self.popen.wait(5)


@dataclass
class Pipeline:
    database_url: str
    broker_url: str
    tmp: Path
    env: dict[str, str] = field(default_factory=dict)
    procs: list[Proc] = field(default_factory=list)

    def environ(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        env = {
            key: value for key, value in os.environ.items() if not key.startswith("QUOTA_LEDGER_")
        }
        env.update(
            QUOTA_LEDGER_DATABASE_URL=self.database_url,
            QUOTA_LEDGER_BROKER_URL=self.broker_url,
            PYTHONUNBUFFERED="1",
            COLUMNS="200",
        )
        env.update(self.env)
        env.update(extra or {})
        return env

    def start(
        self,
        name: str,
        args: Sequence[str],
        *,
        module: str = "worker",
        env: dict[str, str] | None = None,
    ) -> Proc:
        """``quota-ledger <args>`` (the console script of this environment), or
        ``python -m <module> <args>`` for a wrapper module such as the poison worker."""
        script = Path(sys.executable).with_name("quota-ledger")
        if module == "worker" and script.exists():
            command = [str(script), *args]
        else:
            command = [sys.executable, "-m", module, *args]
        log = self.tmp / f"{name}.log"
        handle = log.open("wb")
        popen = subprocess.Popen(
            command,
            cwd=REPO,
            env=self.environ(env),
            stdout=handle,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        handle.close()
        proc = Proc(name, popen, log)
        self.procs.append(proc)
        return proc

    def worker(
        self,
        name: str = "worker",
        *,
        concurrency: int = 4,
        module: str = "worker",
        env: dict[str, str] | None = None,
    ) -> Proc:
        """A real ``quota-ledger worker --concurrency N``, returned once it is ready."""
        proc = self.start(
            name,
            ["worker", "--concurrency", str(concurrency), "--loglevel", "INFO"],
            module=module,
            env=env,
        )
        proc.wait_for_log(" ready.", timeout=60)
        return proc

    def cli(
        self, *args: str, input_text: str | None = None, timeout: float = 60
    ) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "worker", *args],
            cwd=REPO,
            env=self.environ(),
            input=input_text,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def stop_all(self) -> None:
        for proc in reversed(self.procs):
            proc.stop()


@contextlib.contextmanager
def pipeline_on(database_url: str, broker_url: str, tmp: Path) -> Iterator[Pipeline]:
    """The schema brought to head on ``database_url``, and a process factory on it whose
    processes are all stopped at the end."""
    upgrade(database_url)
    pipe = Pipeline(database_url, broker_url, tmp)
    try:
        yield pipe
    finally:
        pipe.stop_all()
