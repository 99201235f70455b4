"""The checkpoint folder's tokenizer, when it has one (random test checkpoints have none: ids only)."""
from __future__ import annotations

from pathlib import Path

_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")


def load_tokenizer(model_dir: str | Path):
    """A transformers tokenizer loaded from `model_dir` (local files only), or None without tokenizer files."""
    root = Path(model_dir)
    if not any((root / f).is_file() for f in _FILES):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(root), local_files_only=True)
