"""s3:// locations on AWS S3 or an S3-compatible store (MinIO, Ceph RGW): client, download, upload, listing.

Used by the trainer (inputs, checkpoints, the adapter) and by the adapter fetcher beside vLLM; never by the
operator, which holds no S3 credentials. boto3 is imported when a client is made, so importing this module
costs nothing. Credentials come from the location's Secret, mounted at `storage.s3_secret_dir(name)` (one file
per key), or else from boto3's own chain (environment, IRSA, instance profile).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from kubetune import storage
from kubetune.storage import Access

# Keys of an s3.secretName Secret that are read (as environment variable names, so the same Secret works with
# envFrom in other tools).
SECRET_KEYS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_REGION")


class S3Error(Exception):
    """A location that cannot be read or written; `not_found` when nothing is there."""

    def __init__(self, message: str, not_found: bool = False) -> None:
        super().__init__(message)
        self.not_found = not_found


def secret_values(name: str) -> dict[str, str]:
    """The keys of SECRET_KEYS present in the mounted Secret `name`."""
    folder = Path(storage.s3_secret_dir(name))
    if not folder.is_dir():
        raise S3Error(f"the Secret {name} of this s3:// location is not mounted at {folder}")
    values = {}
    for key in SECRET_KEYS:
        path = folder / key
        if path.is_file():
            values[key] = path.read_text().strip()
    return values


def client(access: Access) -> Any:
    """A boto3 S3 client for `access`. With an endpoint (not AWS), buckets are addressed by path."""
    try:
        import boto3
        from botocore.config import Config
    except ImportError as err:
        raise S3Error("s3:// needs boto3, which this image does not have") from err
    values = secret_values(access.secret_name) if access.secret_name else {}
    endpoint = access.endpoint or values.get("AWS_ENDPOINT_URL") or os.environ.get("AWS_ENDPOINT_URL") or None
    region = access.region or values.get("AWS_REGION") or None
    config = Config(
        s3={"addressing_style": "path"} if endpoint else {},
        # botocore's own tries of one request (the first and 5 retries); AWS_MAX_ATTEMPTS, the AWS SDKs'
        # variable for the same number, overrides it.
        retries={"total_max_attempts": int(os.environ.get("AWS_MAX_ATTEMPTS") or 6), "mode": "standard"},
    )
    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name=region,
        aws_access_key_id=values.get("AWS_ACCESS_KEY_ID"),
        aws_secret_access_key=values.get("AWS_SECRET_ACCESS_KEY"),
        aws_session_token=values.get("AWS_SESSION_TOKEN"),
        config=config,
    )


def split(uri: str) -> tuple[str, str]:
    """s3://BUCKET/KEY -> (BUCKET, KEY) with the key's slashes trimmed."""
    loc = storage.parse(uri)
    if loc.scheme != "s3":
        raise ValueError(f"not an s3:// URI: {uri}")
    return loc.root, loc.path


def _error(err: Exception, what: str) -> S3Error:
    code = str(getattr(err, "response", {}).get("Error", {}).get("Code", ""))
    return S3Error(f"{what}: {err}", not_found=code in ("404", "NoSuchKey", "NoSuchBucket"))


def list_keys(s3: Any, uri: str) -> dict[str, int]:
    """Every object under the prefix of `uri` (key relative to the prefix -> size); "" is the object itself."""
    bucket, prefix = split(uri)
    found: dict[str, int] = {}
    try:
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            for obj in page.get("Contents", []):
                key = obj["Key"]
                if key == prefix:
                    found[""] = obj["Size"]
                elif key.startswith(prefix.rstrip("/") + "/" if prefix else "") and not key.endswith("/"):
                    found[key[len(prefix) :].lstrip("/")] = obj["Size"]
    except Exception as err:
        raise _error(err, f"listing {uri}") from err
    return found


def content_tag(s3: Any, uri: str) -> str:
    """One tag of the content under `uri` (from the listing's keys and ETags, no object read): it changes when
    any object does. S3Error(not_found) when nothing is there."""
    bucket, prefix = split(uri)
    tags = []
    try:
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            tags += [f"{o['Key']}={o.get('ETag', '')}:{o['Size']}" for o in page.get("Contents", [])]
    except Exception as err:
        raise _error(err, f"listing {uri}") from err
    if not tags:
        raise S3Error(f"nothing at {uri}", not_found=True)
    return hashlib.sha256("\n".join(sorted(tags)).encode()).hexdigest()[:32]


def download(s3: Any, uri: str, dest: Path, progress: Callable[[int, int], None] | None = None) -> Path:
    """Download s3://BUCKET/KEY (one object) or every object under the prefix into `dest`, atomically: into a
    sibling folder first, then renamed into place (an older copy is replaced). S3Error(not_found) when empty.
    `progress(done, total)` is called with the bytes as they arrive."""
    keys = list_keys(s3, uri)
    if not keys:
        raise S3Error(f"nothing at {uri}", not_found=True)
    bucket, prefix = split(uri)
    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = dest.with_name(f".{dest.name}.{uuid.uuid4().hex[:8]}")
    total, done = sum(keys.values()), [0]

    def arrived(chunk: int) -> None:
        done[0] += chunk
        if progress is not None:
            progress(done[0], total)

    try:
        if "" in keys:  # an object: the file itself
            s3.download_file(bucket, prefix, str(staging), Callback=arrived)
        else:
            for relative in sorted(keys):
                target = staging / relative
                target.parent.mkdir(parents=True, exist_ok=True)
                s3.download_file(bucket, f"{prefix}/{relative}" if prefix else relative, str(target), Callback=arrived)
        replace(staging, dest)
    except S3Error:
        raise
    except Exception as err:
        raise _error(err, f"downloading {uri}") from err
    finally:
        remove(staging)
    return dest


def replace(staging: Path, dest: Path) -> None:
    """Rename `staging` to `dest`, replacing what is there."""
    if dest.exists():
        old = dest.with_name(f".{dest.name}.old.{uuid.uuid4().hex[:8]}")
        dest.rename(old)
        staging.rename(dest)
        remove(old)
    else:
        staging.rename(dest)


def remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists():
        path.unlink()


def upload_file(s3: Any, path: Path, uri: str) -> None:
    bucket, key = split(uri)
    try:
        s3.upload_file(str(path), bucket, key)
    except Exception as err:
        raise _error(err, f"uploading {path} to {uri}") from err


def upload_dir(s3: Any, folder: Path, uri: str, last: Iterable[str] = (), skip: Iterable[str] = ()) -> list[str]:
    """Upload every file under `folder` to the prefix `uri`; the files named in `last` after all others (a
    reader that waits for them sees the rest complete). Returns the relative keys uploaded."""
    skipped, final = set(skip), list(last)
    files = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    files = [f for f in files if f not in skipped]
    ordered = [f for f in files if f not in final] + [f for f in final if f in files]
    for relative in ordered:
        upload_file(s3, folder / relative, storage.join(uri, relative))
    return ordered


def delete_keys(s3: Any, uri: str, relative_keys: Iterable[str]) -> None:
    """Delete the objects `uri`/KEY for each key (1000 per request, S3's limit)."""
    bucket, prefix = split(uri)
    keys = [f"{prefix}/{k}" if prefix else k for k in relative_keys]
    try:
        for start in range(0, len(keys), 1000):
            batch = [{"Key": k} for k in keys[start : start + 1000]]
            s3.delete_objects(Bucket=bucket, Delete={"Objects": batch, "Quiet": True})
    except Exception as err:
        raise _error(err, f"deleting under {uri}") from err


def delete_prefix(s3: Any, uri: str) -> None:
    """Delete every object under the prefix `uri`."""
    delete_keys(s3, uri, [k for k in list_keys(s3, uri) if k])


def read_json(s3: Any, uri: str) -> Any:
    """The JSON object at `uri`; S3Error(not_found) when there is none."""
    bucket, key = split(uri)
    try:
        body = s3.get_object(Bucket=bucket, Key=key)["Body"].read()
    except Exception as err:
        raise _error(err, f"reading {uri}") from err
    return json.loads(body)
