"""Workdir files on a local disk or in a bucket (`gs://...`, anything tf.io.gfile can open).

On a TPU pod every host must see one workdir, which is a bucket; Orbax handles its checkpoints
there itself, and the job's other files (config.json, metrics.jsonl, image grids, summary.json,
the exported policy) go through these helpers. Local paths behave as plain files.
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
    _gfile().makedirs(os.fspath(path))


def open_file(path: str | os.PathLike, mode: str = "r") -> IO:
    """A file object for a local path or a URL; modes as `open` ('r', 'w', 'a', 'rb', 'wb')."""
    return _gfile().GFile(os.fspath(path), mode)


def exists(path: str | os.PathLike) -> bool:
    return _gfile().exists(os.fspath(path))


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
