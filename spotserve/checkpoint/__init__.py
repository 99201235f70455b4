"""`python -m spotserve.checkpoint`: list model names and write random-weight checkpoints."""
