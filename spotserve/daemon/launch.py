"""Starts and stops a spotserve-daemon process (one per GPU or CPU slot) with a fresh token."""
from __future__ import annotations

import os
import secrets
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from spotserve.daemon.client import DaemonClient
from spotserve.daemon.paths import check_instance_name, run_dir, socket_path, token_path
from spotserve.daemon.protocol import DaemonError


def daemon_binary() -> Path:
    """Path of the built daemon: $SPOTSERVE_DAEMON_BIN, else spotserve/bin/spotserve-daemon."""
    env = os.environ.get("SPOTSERVE_DAEMON_BIN")
    path = Path(env) if env else Path(__file__).resolve().parent.parent / "bin" / "spotserve-daemon"
    if not path.is_file():
        raise FileNotFoundError(f"spotserve-daemon not found at {path}; rebuild with `pip install -e .`")
    return path


@dataclass
class DaemonConfig:
    """One daemon instance: `name` must be unique on the host; `device` is "cpu" or "cuda:N"."""

    name: str
    device: str = "cpu"
    run_dir: str | None = None
    capacity_bytes: int = 0  # 0: no limit beyond the memory itself
    start_timeout_s: float = 10.0
    verbose: bool = False

    def __post_init__(self):
        check_instance_name(self.name)
        if self.device != "cpu" and not (self.device.startswith("cuda:") and self.device[5:].isdigit()):
            raise ValueError(f"DaemonConfig.device must be 'cpu' or 'cuda:N', got {self.device!r}")
        if self.capacity_bytes < 0:
            raise ValueError(f"DaemonConfig.capacity_bytes must be >= 0, got {self.capacity_bytes}")
        if self.start_timeout_s <= 0:
            raise ValueError(f"DaemonConfig.start_timeout_s must be positive, got {self.start_timeout_s}")
        socket_path(self.name, self.run_dir)  # validates the length early


class DaemonProcess:
    """A running daemon owned by this process. Use `start`, then `client()`; `stop` (SIGTERM)
    frees its memory, `kill` (SIGKILL) leaves stale segments for the next start to remove."""

    def __init__(self, config: DaemonConfig, proc: subprocess.Popen, token: str, log_path: Path):
        self.config = config
        self.proc = proc
        self.token = token
        self.log_path = log_path

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def socket_path(self) -> Path:
        return socket_path(self.config.name, self.config.run_dir)

    @classmethod
    def start(cls, config: DaemonConfig) -> "DaemonProcess":
        """Writes a fresh token file (0600), launches the daemon and waits until it answers.

        Raises RuntimeError with the daemon's log if it exits or does not answer in time.
        """
        directory = run_dir(config.run_dir)
        directory.mkdir(parents=True, exist_ok=True)
        token = secrets.token_hex(24)
        tok = token_path(config.name, config.run_dir)
        fd = os.open(tok, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(token + "\n")
        log_path = directory / f"spotserve-{config.name}.log"
        args = [str(daemon_binary()), "--name", config.name, "--device", config.device,
                "--socket", str(socket_path(config.name, config.run_dir)), "--token-file", str(tok),
                "--capacity", str(config.capacity_bytes)]
        if config.verbose:
            args.append("--verbose")
        with open(log_path, "ab") as log:
            # A new session: a signal aimed at the launcher's process group does not reach it.
            proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True)
        daemon = cls(config, proc, token, log_path)
        daemon._wait_ready()
        return daemon

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.config.start_timeout_s
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"spotserve-daemon exited with {self.proc.returncode}: {self.log_tail()}")
            try:
                with self.client(timeout=2.0) as c:
                    c.stats()
                return
            except DaemonError:
                if time.monotonic() > deadline:
                    self.kill()
                    raise RuntimeError(f"spotserve-daemon did not answer in {self.config.start_timeout_s}s: "
                                       f"{self.log_tail()}") from None
                time.sleep(0.01)

    def log_tail(self, lines: int = 20) -> str:
        """The last lines of the daemon's JSON-lines log."""
        try:
            return "\n".join(self.log_path.read_text().splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def client(self, timeout: float = 30.0) -> DaemonClient:
        """A new connection to this daemon."""
        return DaemonClient(self.socket_path, self.token, timeout)

    def stop(self, timeout: float = 10.0) -> int:
        """SIGTERM and wait; returns the exit status. The daemon frees all its segments."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        status = self.proc.wait(timeout)
        token_path(self.config.name, self.config.run_dir).unlink(missing_ok=True)
        return status

    def kill(self) -> int:
        """SIGKILL and wait (simulates a crash: segments stay until the next start)."""
        if self.proc.poll() is None:
            self.proc.kill()
        return self.proc.wait()
