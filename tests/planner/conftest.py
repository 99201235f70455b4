"""Fixtures of tests/planner live in planner_helpers.py (a unique module name: tests in other folders have a conftest too)."""
from planner_helpers import *  # noqa: F401,F403
