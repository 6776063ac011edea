"""Files on a local disk or in a bucket (`gs://...`, anything tf.io.gfile can open).

On a TPU pod every host must see one workdir, which is a bucket; Orbax handles its checkpoints
there itself, and the job's other files (config.json, metrics.jsonl, image grids, summary.json,
the exported policy) and its PairUG inputs (pairs, images, the eval set) go through these
helpers. Local paths take the plain-file route (`open`, `os.path`), exactly as before.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from typing import IO


def _gfile():
    import tensorflow as tf

    return tf.io.gfile


def is_url(path: str | os.PathLike) -> bool:
    """Whether `path` names a file system by scheme (gs://, s3://, ram://...)."""
    return "://" in os.fspath(path)


def absolute(path: str | os.PathLike) -> str:
    """A local path made absolute; a URL as it is (os.path.abspath would turn gs://b/x into a
    local directory named 'gs:')."""
    path = os.fspath(path)
    return path if is_url(path) else os.path.abspath(path)


def makedirs(path: str | os.PathLike) -> None:
    """Create a directory and its parents (no-op if it exists)."""
    path = os.fspath(path)
    if is_url(path):
        _gfile().makedirs(path)
    else:
        os.makedirs(path, exist_ok=True)


def open_file(path: str | os.PathLike, mode: str = "r") -> IO:
    """`open(path, mode)` for a local path; a tf.io.gfile file object for a URL."""
    path = os.fspath(path)
    return _gfile().GFile(path, mode) if is_url(path) else open(path, mode)  # noqa: SIM115


def exists(path: str | os.PathLike) -> bool:
    path = os.fspath(path)
    return _gfile().exists(path) if is_url(path) else os.path.exists(path)


def isdir(path: str | os.PathLike) -> bool:
    path = os.fspath(path)
    return _gfile().isdir(path) if is_url(path) else os.path.isdir(path)


@contextlib.contextmanager
def local_directory(path: str | os.PathLike) -> Iterator[str]:
    """A local directory to write into that ends up at `path`: `path` itself when local; for a URL
    a temporary directory whose files are uploaded there (recursively) when the block ends, for
    writers that only know local files (safetensors, tokenizers)."""
    path = os.fspath(path)
    if not is_url(path):
        os.makedirs(path, exist_ok=True)
        yield path
        return
    gfile = _gfile()
    with tempfile.TemporaryDirectory() as staging:
        yield staging
        for root, _, names in os.walk(staging):
            rel = os.path.relpath(root, staging)
            target = path if rel == "." else f"{path.rstrip('/')}/{rel.replace(os.sep, '/')}"
            gfile.makedirs(target)
            for name in names:
                gfile.copy(os.path.join(root, name), f"{target.rstrip('/')}/{name}",
                           overwrite=True)
