"""spotserve: serve large language models on preemptible (spot) GPU instances.

The package root imports nothing heavy: the policy core (planner, controller) never needs torch.
"""

__version__ = "0.1.0"
