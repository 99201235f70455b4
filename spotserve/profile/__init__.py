"""Measures the engine on the machine it runs on: `python -m spotserve.profile --model NAME --out FILE.json`.

Modules: weights (random weights built on the device), timing (timers, the machine's copy and
matmul ceilings), profiler (the cost-model profile), plain_torch and contenders (the baselines
scripts/bench_engine.py compares the engine with).
"""
