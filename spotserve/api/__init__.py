"""HTTP API of the live service (FastAPI app factory and tokenizer loading)."""
