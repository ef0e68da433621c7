"""WebDataset tar shards: `prep shard`, `prep verify` and the readers (docs/sharding.md)."""
