"""`python -m spotserve.experiment`: the paper's experiments, baselines, ablations and plots."""
