"""One replica's inference engine: paged KV cache, continuous batching, tensor and pipeline parallel execution.

Modules: config (EngineConfig), sequence (request state), block_manager (KV block accounting),
kv_cache (the per-worker KV tensor), kv_reshard (moving a request's KV between configs),
scheduler (continuous batching), sampling, layers (tensor-parallel layers), model (the decoder of
the three families, one pipeline stage), dist (process groups, rendezvous), watch (heartbeats naming lost peers),
runner (one worker's forward over micro-batches), engine (the SPMD loop tying them together).
Import the torch-backed pieces from their modules; this package root stays light.
"""
