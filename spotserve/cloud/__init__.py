"""Availability sources: when instances appear and when the cloud reclaims them (trace replay)."""
from spotserve.cloud.availability import (
    AvailabilityEvent,
    AvailabilityTrace,
    label_ondemand_replacements,
    load_availability,
    parse_availability_lines,
    parse_g4dn_csv_lines,
)
from spotserve.cloud.replay import ReplayEvent, replay_events

__all__ = [
    "AvailabilityEvent",
    "AvailabilityTrace",
    "label_ondemand_replacements",
    "load_availability",
    "parse_availability_lines",
    "parse_g4dn_csv_lines",
    "ReplayEvent",
    "replay_events",
]
