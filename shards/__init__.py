"""Write, verify and stream WebDataset tar shards (see the `prep shard` issue)."""
