"""Discrete-event simulator backend: the same controller and planner on a modelled cluster."""
