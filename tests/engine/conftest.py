"""Fixtures of tests/engine live in engine_helpers.py (a unique module name: tests in other folders have a conftest too)."""
from engine_helpers import *  # noqa: F401,F403
