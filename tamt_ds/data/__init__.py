"""Streaming pre-training corpora: sources -> tokenise + pack -> MLM batches, resumable.

See docs/data.md. The search loop needs only what is re-exported here.
"""

from .corpus import (
    BlockLoader,
    CorpusArguments,
    build_block_loader,
    build_validation_batches,
    default_train_files,
    default_validation_files,
)
from .errors import CorpusError

__all__ = [
    "BlockLoader",
    "CorpusArguments",
    "CorpusError",
    "build_block_loader",
    "build_validation_batches",
    "default_train_files",
    "default_validation_files",
]
