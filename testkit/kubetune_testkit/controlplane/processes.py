"""Child processes of the test control plane (and of the e2e node): starting them tied to
this process, stopping them, and waiting for them to come up; plus free ports, HTTP health
probes, and serving until SIGTERM for the command lines."""

from __future__ import annotations

import ctypes
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol, TypeVar

from .errors import ControlPlaneError

T = TypeVar("T")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _die_with_parent() -> None:
    # Children of a process killed with SIGKILL would otherwise keep running and
    # holding ports; PR_SET_PDEATHSIG (1) asks the kernel to SIGTERM them instead.
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGTERM, 0, 0, 0)


class Process:
    def __init__(self, name: str, argv: Sequence[str], log_path: Path) -> None:
        self.name = name
        self.argv = list(argv)
        self.log_path = log_path
        self._popen: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        on_main_thread = threading.current_thread() is threading.main_thread()
        with self.log_path.open("wb") as log:
            self._popen = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                # PDEATHSIG follows the creating thread, so only tie children to the
                # main thread, which lives as long as the process.
                preexec_fn=_die_with_parent if sys.platform == "linux" and on_main_thread else None,  # noqa: PLW1509
            )

    @property
    def pid(self) -> int | None:
        return self._popen.pid if self._popen else None

    def exit_code(self) -> int | None:
        return self._popen.poll() if self._popen else None

    def running(self) -> bool:
        return self._popen is not None and self._popen.poll() is None

    def stop(self, timeout: float = 15.0) -> None:
        popen = self._popen
        if popen is None or popen.poll() is not None:
            return
        popen.terminate()
        try:
            popen.wait(timeout)
        except subprocess.TimeoutExpired:
            popen.kill()
            popen.wait(timeout)

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])


class WaitTimeout(ControlPlaneError, TimeoutError):
    """What :func:`wait_until` raises when time is up: a control plane error and a
    ``TimeoutError`` both."""


class ProcessExited(ControlPlaneError):
    def __init__(self, process: Process) -> None:
        self.process = process
        super().__init__(
            f"{process.name} exited with code {process.exit_code()} during startup "
            f"(log: {process.log_path}):\n{process.log_tail()}"
        )

    @property
    def port_in_use(self) -> bool:
        return "address already in use" in self.process.log_tail(200)


def wait_until(
    predicate: Callable[[], T | None],
    *,
    timeout: float = 30.0,
    interval: float = 0.2,
    what: str = "condition",
    processes: Iterable[Process] = (),
) -> T:
    """Poll ``predicate`` until it returns something truthy, and return that. Raise
    :class:`WaitTimeout` after ``timeout`` seconds (with the log tails of ``processes``),
    or :class:`ProcessExited` as soon as one of ``processes`` is no longer running."""
    deadline = time.monotonic() + timeout
    watched = list(processes)
    while True:
        for process in watched:
            if not process.running():
                raise ProcessExited(process)
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            tails = "".join(
                f"\n--- {process.name} ({process.log_path}) ---\n{process.log_tail()}" for process in watched
            )
            raise WaitTimeout(f"timed out after {timeout:g}s waiting for {what}{tails}")
        time.sleep(interval)


def http_ok(url: str, context: ssl.SSLContext | None = None, expect: str | None = None) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2, context=context) as response:
            body = response.read().decode(errors="replace")
    except (OSError, urllib.error.URLError):
        return False
    return expect is None or expect in body


class Served(Protocol):
    """What :func:`serve_until_signal` runs: a control plane, or the e2e node."""

    def start(self) -> None: ...

    def stop(self) -> None: ...

    def exited_processes(self) -> list[str]: ...


def serve_until_signal(
    served: Served,
    directory: Path,
    *,
    what: str,
    state: Callable[[], Mapping[str, Any]],
    ready: Callable[[], str],
) -> int:
    """Start ``served``; write ``directory/ready`` (JSON: this pid and ``state()``) and
    print ``ready()`` once it is up; run until SIGTERM or SIGINT (0) or until one of its
    processes exits (1). ``served`` is stopped and the ready file removed at the end."""
    stop = threading.Event()

    def request_stop(signum: int, _frame: object) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    ready_file = directory / "ready"
    ready_file.unlink(missing_ok=True)
    try:
        try:
            served.start()
        except ControlPlaneError as error:
            print(f"{what} failed to start: {error}", file=sys.stderr)
            return 1
        ready_file.write_text(json.dumps({"pid": os.getpid(), **state()}, indent=2) + "\n")
        print(ready(), flush=True)
        while not stop.wait(1.0):
            exited = served.exited_processes()
            if exited:
                print(
                    f"{what} process exited: {', '.join(exited)}; see the logs in {directory}",
                    file=sys.stderr,
                )
                return 1
        return 0
    finally:
        ready_file.unlink(missing_ok=True)
        served.stop()
