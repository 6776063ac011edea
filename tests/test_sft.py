"""SFT data: unconditional generation rows for classifier-free guidance."""

import os

import numpy as np
import pytest

from pairuni_jax.train import sft as sft_lib
from pairuni_jax.train.metrics import read_jsonl
from tests import rl_tiny


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    world = str(tmp_path_factory.mktemp("world"))
    rl_tiny.write_tiny_world(world)
    proc = rl_tiny.processor(world)
    pairs = read_jsonl(os.path.join(world, "train_aligned_pairs.jsonl"))
    image = np.zeros((32, 32, 3), np.uint8)
    und = [(image, p["understand_ann"]["question"], p["understand_ann"]["answer"]) for p in pairs]
    gen = [(p["generate_ann"]["prompt"], np.arange(64) + i) for i, p in enumerate(pairs)]
    return proc, sft_lib.build_sft_data(proc, und, gen)


def test_unconditional_prompts_are_the_rollouts_rows(tiny_data):
    proc, data = tiny_data
    for ids, mask, uncond in zip(data.gen_ids, data.gen_mask, data.gen_uncond_ids, strict=True):
        assert list(uncond[mask]) == proc.unconditional_ids(list(ids[mask]))
        assert (uncond[~mask] == proc.pad_id).all()


def test_cfg_dropout_replaces_that_share_of_generation_prompts(tiny_data):
    proc, data = tiny_data
    plain = data.batch(np.random.default_rng(0), 2000)
    assert (plain["gen"]["prompt_ids"] != proc.pad_id).sum(1).min() > 2  # every prompt has text
    batch = data.batch(np.random.default_rng(0), 2000, cfg_dropout=0.25)
    ids = batch["gen"]["prompt_ids"]  # [B, L]
    dropped = (ids != proc.pad_id).sum(1) == 2  # only BOS and <begin_of_image> left
    assert 0.22 < dropped.mean() < 0.28
    # The same rows, codes and masks as without dropout; kept rows keep their prompts.
    np.testing.assert_array_equal(batch["gen"]["response_ids"], plain["gen"]["response_ids"])
    np.testing.assert_array_equal(batch["gen"]["prompt_mask"], plain["gen"]["prompt_mask"])
    np.testing.assert_array_equal(ids[~dropped], plain["gen"]["prompt_ids"][~dropped])
    np.testing.assert_array_equal(batch["und"]["prompt_ids"], plain["und"]["prompt_ids"])


@pytest.mark.parametrize("share", [-0.1, 1.0])
def test_a_cfg_dropout_outside_0_1_is_refused(share):
    with pytest.raises(ValueError, match="cfg_dropout"):
        sft_lib.SFTConfig(cfg_dropout=share)
