"""Fine-tuning with pemoe adapters: ``pemoe train`` / ``pemoe eval`` (PyTorch).

* :mod:`pemoe.train.data` — JSONL examples, the built-in synthetic multi-task set, batching, a resumable stream;
* :mod:`pemoe.train.tokenizer` — the built-in byte tokenizer, a local SentencePiece model or transformers tokenizer;
* :mod:`pemoe.train.models` — model families: T5 and transformers causal LMs (encoding, forward, FSDP units);
* :mod:`pemoe.train.loop` — the training loop, checkpoints (adapter weights + optimizer + data state), resume;
* :mod:`pemoe.train.jax_loop` — the same loop in JAX (``pemoe train --framework jax``; imported on demand);
* :mod:`pemoe.train.evaluate` — rank classification (median over templates), routing statistics (Figure 5);
* :mod:`pemoe.train.report` — loss curves, routing plots and the markdown summary of a comparison.
"""

from pemoe.train.data import BadLineError, Example, load_dataset, read_jsonl, synthetic_multitask, write_synthetic
from pemoe.train.evaluate import EvalResult, rank_classification, routing_statistics
from pemoe.train.loop import CheckpointMismatch, TrainConfig, TrainResult, train

__all__ = [
    "BadLineError",
    "CheckpointMismatch",
    "EvalResult",
    "Example",
    "TrainConfig",
    "TrainResult",
    "load_dataset",
    "rank_classification",
    "read_jsonl",
    "routing_statistics",
    "synthetic_multitask",
    "train",
    "write_synthetic",
]
