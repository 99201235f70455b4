"""Fixtures for context-daemon tests: short run dirs (Unix socket paths are limited to 107 bytes)
and daemons with unique instance names, stopped and checked for leftovers afterwards."""
from __future__ import annotations

import itertools
import os
import shutil
import tempfile
from pathlib import Path

import pytest

from spotserve.daemon import DaemonConfig, DaemonProcess

SHM = Path("/dev/shm")
_names = itertools.count()


def shm_entries(instance: str) -> list[str]:
    """Files in /dev/shm that belong to daemon instance `instance`."""
    return sorted(p.name for p in SHM.iterdir() if p.name.startswith(f"spotserve.{instance}."))


def unique_name(tag: str = "t") -> str:
    return f"{tag}{os.getpid()}x{next(_names)}"


@pytest.fixture
def run_dir():
    d = tempfile.mkdtemp(prefix="sd", dir="/tmp")
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def start_daemon(run_dir):
    """start_daemon(**config) -> DaemonProcess; every daemon is stopped at teardown and must leave
    nothing in /dev/shm."""
    started: list[DaemonProcess] = []

    def start(**kw) -> DaemonProcess:
        kw.setdefault("name", unique_name())
        kw.setdefault("run_dir", run_dir)
        d = DaemonProcess.start(DaemonConfig(**kw))
        started.append(d)
        return d

    yield start
    for d in started:
        d.stop()
    for d in started:
        leftovers = shm_entries(d.config.name)
        for leaf in leftovers:  # do not leak into the next test even when this one fails
            (SHM / leaf).unlink(missing_ok=True)
        assert leftovers == [], f"daemon {d.config.name} left {leftovers} in /dev/shm"


@pytest.fixture
def shm_of():
    """shm_of(instance) -> sorted /dev/shm entries of that daemon instance."""
    return shm_entries


@pytest.fixture
def new_name():
    """new_name() -> an instance name unique to this test run."""
    return unique_name
