"""DDP trainer and evaluator streaming the shards: `train/main.py` (docs/training.md)."""
