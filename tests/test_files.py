"""The job's files in a bucket: the writers go through pairuni_jax/files.py, tried on TensorFlow's
in-memory file system (ram://), which tf.io.gfile serves like gs://."""

import io
import json
import os
import uuid

import jax
import ml_collections
import numpy as np
import pytest
import tensorflow as tf
from micro_job import smoke_config
from PIL import Image
from tiny_tokenizer import save_tiny_tokenizer

from pairuni_jax import files
from pairuni_jax.checkpoints import load_janus
from pairuni_jax.models import configs, janus
from pairuni_jax.processing import JanusProcessor
from pairuni_jax.train import run
from pairuni_jax.train.metrics import MetricsWriter, read_jsonl
from pairuni_jax.train.pairug_job import save_policy
from pairuni_jax.train.shapes_job import ShapesJob


def _bucket() -> str:
    return f"ram://bucket-{uuid.uuid4().hex[:8]}/run"


def test_urls_stay_urls_and_local_paths_become_absolute():
    assert files.absolute("gs://b/run/checkpoints") == "gs://b/run/checkpoints"
    assert files.absolute("runs/x") == os.path.abspath("runs/x")
    assert files.is_url("gs://b") and not files.is_url("/tmp/gs:/b")


def test_the_shapes_job_refuses_a_bucket_workdir():
    with pytest.raises(ValueError, match="--workdir=gs://b/x: the Shapes job .* local"):
        ShapesJob(smoke_config(), "gs://b/x")


def test_metrics_writer_and_config_in_a_bucket():
    workdir = _bucket()
    config = ml_collections.ConfigDict({"job": "pairug", "seed": 3})
    run._write_config(config, workdir)
    with files.open_file(f"{workdir}/config.json") as f:
        assert json.load(f) == {"job": "pairug", "seed": 3}

    images = np.full((2, 8, 8, 3), 200, np.uint8)
    with MetricsWriter(f"{workdir}/rl") as writer:
        writer.scalars(1, {"loss": 0.5})
        png = writer.images(1, "samples", images, ["a", "b"])
    with MetricsWriter(f"{workdir}/rl") as writer:  # a resumed run appends
        writer.scalars(2, {"loss": float("nan")})
    assert read_jsonl(f"{workdir}/rl/metrics.jsonl") == [
        {"step": 1, "loss": 0.5}, {"step": 2, "loss": None}]
    assert png.startswith("ram://")
    with files.open_file(png, "rb") as f:
        assert Image.open(io.BytesIO(f.read())).size[0] >= 2 * 8
    assert any(n.startswith("events.out.tfevents") for n in tf.io.gfile.listdir(f"{workdir}/rl/tb"))
    assert not os.path.exists("ram:")  # nothing went to a local directory named after the scheme


def _download(url: str, local) -> None:
    """Copy the tree under `url` to the local directory `local`."""
    for root, _, names in tf.io.gfile.walk(url):
        rel = root[len(url):].lstrip("/")
        os.makedirs(os.path.join(local, rel), exist_ok=True)
        for name in names:
            tf.io.gfile.copy(f"{root.rstrip('/')}/{name}", os.path.join(local, rel, name))


def test_exported_policy_reaches_a_bucket_whole(tmp_path):
    config = configs.tiny()
    params = janus.init_params(config, 0)
    save_tiny_tokenizer(tmp_path / "tok")
    processor = JanusProcessor.from_pretrained(tmp_path / "tok", image_size=16,
                                               num_image_tokens=16)
    target = f"{_bucket()}/model"
    save_policy(config, params, processor, target)
    _download(target, tmp_path / "back")
    config2, params2 = load_janus(str(tmp_path / "back"))
    assert config2 == config
    for a, b in zip(jax.tree.leaves(params2), jax.tree.leaves(params), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    back = JanusProcessor.from_pretrained(tmp_path / "back", image_size=16, num_image_tokens=16)
    assert back.tokenizer.get_vocab() == processor.tokenizer.get_vocab()

    with files.local_directory(tmp_path / "local") as local:  # a local path is written in place
        assert local == str(tmp_path / "local") and os.path.isdir(local)
