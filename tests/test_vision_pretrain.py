"""Vision-encoder pretraining: patch targets agree with the renderer, training lowers both losses,
and the Shapes job's SFT starts from the pretrained encoder."""

import json
import os
import shutil

import jax
import numpy as np
import pytest
from micro_job import micro_config, micro_run

from pairuni_jax.data.shapes_render import BACKGROUND, COLORS, PALETTE, ShapeObject, render
from pairuni_jax.models import janus
from pairuni_jax.models.configs import SigLIPConfig
from pairuni_jax.models.random_init import random_params
from pairuni_jax.models.siglip import SigLIPVisionModel
from pairuni_jax.train import sft as sft_lib
from pairuni_jax.train import shapes_job
from pairuni_jax.train.stages import run_stages
from pairuni_jax.train.vision_pretrain import VisionPretrainConfig, patch_targets, pretrain_vision

SCENE = (ShapeObject("circle", "red", 0.3, 0.3, 0.3),
         ShapeObject("triangle", "blue", 0.7, 0.6, 0.35),
         ShapeObject("square", "green", 0.32, 0.75, 0.28))


def test_patch_targets_are_the_rendered_pixels_shares_per_patch():
    colour, shape = patch_targets(SCENE, 32, 4)  # [64, 7], [64, 4]
    assert colour.shape == (64, 7) and shape.shape == (64, 4)
    np.testing.assert_allclose(colour.sum(-1), 1.0)
    np.testing.assert_allclose(shape.sum(-1), 1.0)
    img = render(SCENE, 32)  # [32, 32, 3]
    palette = np.array([BACKGROUND] + [PALETTE[c] for c in COLORS])  # [7, 3]
    classes = (img[:, :, None, :] == palette).all(-1).argmax(-1)  # [32, 32]: 0 = background
    want = np.eye(7)[classes].reshape(8, 4, 8, 4, 7).mean((1, 3)).reshape(64, 7)
    np.testing.assert_allclose(colour, want)
    # Shapes follow colours here (one object per colour): red circle, blue triangle, green square.
    np.testing.assert_allclose(shape[:, 1], colour[:, 1 + COLORS.index("red")])
    np.testing.assert_allclose(shape[:, 3], colour[:, 1 + COLORS.index("blue")])
    np.testing.assert_allclose(shape[:, 2], colour[:, 1 + COLORS.index("green")])
    with pytest.raises(ValueError, match="not a multiple of the patch 5"):
        patch_targets(SCENE, 32, 5)


def test_pretraining_lowers_both_losses():
    config = SigLIPConfig(image_size=32, patch_size=4, width=32, depth=1, num_heads=2, mlp_dim=64)
    rng = np.random.default_rng(0)
    scenes = [tuple(ShapeObject(str(rng.choice(["circle", "square", "triangle"])),
                                str(rng.choice(COLORS)), float(x), float(y), 0.3)
                    for x, y in ((0.25, 0.3), (0.7, 0.65)))
              for _ in range(32)]
    pixels = np.stack([render(s, 32) for s in scenes]).astype(np.float32) / 127.5 - 1.0
    targets = [patch_targets(s, 32, 4) for s in scenes]
    colour, shape = np.stack([t[0] for t in targets]), np.stack([t[1] for t in targets])
    shapes = jax.eval_shape(lambda: SigLIPVisionModel(config).init(jax.random.key(0), pixels[:1]))
    params = random_params(shapes["params"], 0)

    def losses(steps):
        cfg = VisionPretrainConfig(steps=steps, batch_size=16, warmup_steps=2, learning_rate=3e-3)
        return pretrain_vision(params, config, pixels, colour, shape, cfg, log=lambda _: None)[1]

    first, last = losses(1), losses(60)
    assert last["colour_loss"] < 0.25 * first["colour_loss"]  # measured: 2.64 -> 0.35
    assert last["shape_loss"] < 0.25 * first["shape_loss"]  # 2.72 -> 0.34
    with pytest.raises(ValueError, match="32 images for 31 colour"):
        pretrain_vision(params, config, pixels, colour[:31], shape, VisionPretrainConfig())


@pytest.mark.slow
def test_the_job_pretrains_the_encoder_and_sft_starts_from_it(tmp_path, monkeypatch):
    workdir = str(tmp_path / "run")
    for stage in ("world", "vq"):  # the micro run's world and VQ: only the later stages run
        shutil.copytree(os.path.join(micro_run()[0], stage), os.path.join(workdir, stage))
    config = micro_config()
    config.vision.steps = 3
    starts = []

    def spy(params, *args, **kwargs):
        starts.append(jax.device_get(params["vision_model"]))
        return real_train_sft(params, *args, **kwargs)

    real_train_sft = sft_lib.train_sft
    monkeypatch.setattr(sft_lib, "train_sft", spy)
    job = shapes_job.ShapesJob(config, workdir)
    assert [s.name for s in job.stages()] == ["world", "vq", "vision", "sft", "pairs", "rl"]
    results = run_stages(workdir, job.stages()[:4], log=lambda _: None)
    with open(os.path.join(workdir, results["vision"]["params"]), "rb") as f:
        saved = shapes_job.flax.serialization.msgpack_restore(f.read())
    jax.tree.map(np.testing.assert_array_equal, starts[0], saved)
    model_config = shapes_job.policy_config(config, len(job.processor().tokenizer))
    init = janus.init_params(model_config, jax.random.key(config.seed))["vision_model"]
    moved = jax.tree.leaves(jax.tree.map(lambda a, b: not np.array_equal(a, b), saved, init))
    assert all(moved)  # pretraining moved every weight of the encoder
    with open(os.path.join(workdir, "sft", "inputs.json")) as f:
        assert json.load(f)["vision"]["steps"] == 3
    # Without the stage (the default), the SFT stage's inputs are what they always were.
    assert "vision" not in [s.name for s in shapes_job.ShapesJob(micro_config(), workdir).stages()]
