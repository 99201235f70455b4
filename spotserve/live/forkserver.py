"""Fork server: imports torch and the engine once, then forks every new worker process from itself.

Starting a worker the plain way (a fresh interpreter importing torch) costs seconds of CPU. On a
cluster that CPU belongs to the new instance; when several instances share one host (a CPU test
bed), every acquisition would steal it from the replicas that are serving and stretch their
decode steps, a slowdown a real cluster does not have. A launcher therefore starts one fork
server (`ForkServer`) while it starts up; each spawn is a fork of that warm process (tens of
milliseconds), which becomes `spotserve.live.worker` with the given arguments, in its own session
with its output appended to a log file. Requests and replies are JSON lines over the server's
stdin / stdout (no pickle). The server ignores SIGCHLD, so the kernel reaps its children; when its
stdin closes (the launcher's process ended) it exits and leaves the workers running: they outlive
a lost controller on their own terms (worker.serve_sessions). A forked worker's command line is
the server's (`python -m spotserve.live.forkserver --tag TAG`): the tag names what started it.

    python -m spotserve.live.forkserver --tag TAG     (started by ForkServer; not for people)
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path


WORKER_COMM = "spotserve-wkr"  # process name of a forked worker (/proc/PID/comm)


class ForkServerError(RuntimeError):
    """The fork server could not start a worker (it died, or the fork failed)."""


class Forked:
    """A worker forked by the server: not a child of ours, so known by pid (Popen-like poll / wait)."""

    def __init__(self, pid: int):
        self.pid = pid
        self.returncode: int | None = None
        self._killed = False

    def poll(self) -> int | None:
        """None while it runs; once gone -SIGKILL if we killed it, else 0 (its status is not ours to reap)."""
        if self.returncode is None and not alive(self.pid):
            self.returncode = -signal.SIGKILL if self._killed else 0
        return self.returncode

    def kill(self) -> None:
        try:
            os.kill(self.pid, signal.SIGKILL)
            self._killed = True
        except ProcessLookupError:
            pass

    def wait(self, timeout: float | None = None) -> int | None:
        """Block until it has exited (subprocess.TimeoutExpired past `timeout`)."""
        import time

        end = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            if end is not None and time.monotonic() > end:
                raise subprocess.TimeoutExpired(f"pid {self.pid}", timeout)
            time.sleep(0.01)
        return self.returncode


class ForkServer:
    """The launcher's side: start the server, ask it for workers."""

    def __init__(self, tag: str, log: str | Path, python: str = sys.executable, env: dict | None = None):
        self._lock = threading.Lock()
        with open(log, "ab") as err:
            self.proc = subprocess.Popen([python, "-m", "spotserve.live.forkserver", "--tag", tag],
                                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, env=env,
                                         start_new_session=True)
        self._ready = False

    def spawn(self, argv: list[str], log: str | Path) -> Forked:
        """Fork a worker running `python -m spotserve.live.worker ARGV`, output appended to `log`."""
        with self._lock:
            if not self._ready:
                self._reply()  # the first spawn waits for the imports
                self._ready = True
            try:
                self.proc.stdin.write((json.dumps({"argv": list(argv), "log": str(log)}) + "\n").encode())
                self.proc.stdin.flush()
            except OSError as exc:
                raise ForkServerError(f"fork server gone: {exc}") from None
            return Forked(int(self._reply()["pid"]))

    def _reply(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise ForkServerError(f"fork server exited with {self.proc.wait()}")
        msg = json.loads(line)
        if "error" in msg:
            raise ForkServerError(msg["error"])
        return msg

    def close(self) -> None:
        """Stop the server (its workers keep running; the launcher kills those it wants gone)."""
        try:
            self.proc.stdin.close()
        except OSError:
            pass
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def alive(pid: int) -> bool:
    """Whether process `pid` runs (a zombie does not: a killed orphan may wait for its reaper; nor does
    one in state X, dead and being reaped)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] not in (b"Z", b"X")  # zombie, or being reaped
    except FileNotFoundError:
        return False
    except OSError:  # no /proc: ask the kernel
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True


def _subreaper() -> None:
    """Adopt orphaned descendants (Linux): a context daemon whose worker died is re-parented here, not
    to init, and the kernel reaps it when it is killed (SIGCHLD is ignored here), so no zombie stays."""
    import ctypes

    try:
        ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER
    except (OSError, AttributeError):
        pass


def _child(req: dict) -> None:
    """In the forked process: become a worker (never returns)."""
    code = 1
    try:
        os.setsid()  # its own session: a kill hits exactly it, the controller's terminal signals do not
        try:  # its command line is the server's; the name tells it apart in ps / top
            with open("/proc/self/comm", "w") as f:
                f.write(WORKER_COMM)
        except OSError:
            pass
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        fd = os.open(req["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.close(fd)
        os.close(null)
        from spotserve.live import worker

        worker.main(req["argv"])  # exits through os._exit
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
        if not isinstance(exc.code, int) and exc.code is not None:
            print(exc.code, file=sys.stderr, flush=True)
    except BaseException:
        import traceback

        traceback.print_exc()
    finally:
        os._exit(code)


def main(argv: list[str] | None = None) -> None:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tag", required=True, help="what started it (shows in every forked worker's command line)")
    ap.parse_args(argv)
    from spotserve.live import worker

    worker.preload()  # what every worker imports anyway: forked children start with it in place

    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # the kernel reaps the workers
    _subreaper()
    out = sys.stdout.buffer
    out.write(b'{"ready": true}\n')
    out.flush()
    for line in sys.stdin.buffer:
        try:
            req = json.loads(line)
            sys.stdout.flush()
            pid = os.fork()
        except (ValueError, OSError) as exc:
            out.write((json.dumps({"error": f"{type(exc).__name__}: {exc}"}) + "\n").encode())
            out.flush()
            continue
        if pid == 0:
            _child(req)
        out.write((json.dumps({"pid": pid}) + "\n").encode())
        out.flush()


if __name__ == "__main__":
    main()
