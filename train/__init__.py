"""DDP trainer and evaluator streaming the shards (see the trainer issue)."""
