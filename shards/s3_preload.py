"""Imported by the forkserver of loader workers that read object storage
(train.data.worker_settings): boto3 and its S3 model are loaded there once, so each worker
forked from it makes its client in ~20 ms instead of ~0.3 s of CPU, which every worker of
every epoch paid before its first shard could arrive."""

from shards.store import load_models

load_models()
