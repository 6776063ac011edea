"""Rollout parity with transformers (greedy text with an image, greedy CFG images), the decode step
against a full forward, EOS handling, log-probs, determinism, compile counts and a sharded mesh."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from janus_tiny import IMAGE_TOKEN_ID, tiny_checkpoint

from pairuni_jax.models import janus
from pairuni_jax.rollout import (
    GREEDY,
    Sampling,
    bucket_length,
    generate_image_tokens,
    generate_images,
    generate_text,
    pad_prompts,
)
from pairuni_jax.rollout_decode import DecodeCache, RowLayout, decode_step

PAD, BOS, EOS, BOI = 0, 1, 2, 3


def _jit(fn):
    """A model function jitted with its config static (eager Flax calls compile op by op)."""
    return jax.jit(fn, static_argnums=1)


forward, embed_tokens, embed_prompt = _jit(janus.forward), _jit(janus.embed_tokens), _jit(
    janus.embed_prompt)
text_logits, image_logits = _jit(janus.text_logits), _jit(janus.image_logits)


def _text_prompts(config, batch: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Left-padded prompts of different lengths, each with one image, and their pixels."""
    rng = np.random.default_rng(seed)
    n_img = config.vision.num_tokens
    rows = [[BOS, *rng.integers(4, 250, 2 + 3 * b), *[IMAGE_TOKEN_ID] * n_img,
             *rng.integers(4, 250, 4)] for b in range(batch)]
    ids, mask = pad_prompts(rows, PAD, bucket=8)
    size = config.vision.image_size
    pixels = rng.uniform(-1, 1, (batch, size, size, 3)).astype(np.float32)
    return ids, mask, pixels


def _image_prompts(batch: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    rows = [[BOS, *rng.integers(4, 250, 3 + 4 * b), BOI] for b in range(batch)]
    return pad_prompts(rows, PAD, bucket=8)


def _text(ck, ids, mask, pixels, rng=0, **kw):
    kw = dict(num_samples=2, max_new_tokens=10, sampling=GREEDY, eos_id=EOS, pad_id=PAD,
              image_token_id=IMAGE_TOKEN_ID) | kw
    return generate_text(ck.params, ck.config, jnp.asarray(ids), jnp.asarray(mask),
                         jax.random.key(rng), jnp.asarray(pixels), **kw)


def _images(ck, ids, mask, rng=0, guidance=3.0, **kw):
    kw = dict(num_samples=2, sampling=GREEDY, bos_id=BOS, boi_id=BOI, pad_id=PAD) | kw
    return generate_image_tokens(ck.params, ck.config, jnp.asarray(ids), jnp.asarray(mask),
                                 jax.random.key(rng), guidance, **kw)


@pytest.mark.parametrize("kind", ["gqa", "deep"])
def test_greedy_text_equals_transformers_generate_with_an_image(torch, kind):
    ck = tiny_checkpoint(kind)
    ids, mask, pixels = _text_prompts(ck.config, 4)
    with torch.no_grad():
        ref = ck.model.generate(
            input_ids=torch.from_numpy(ids.astype(np.int64)),
            attention_mask=torch.from_numpy(mask.astype(np.int64)),
            pixel_values=torch.from_numpy(pixels).permute(0, 3, 1, 2), max_new_tokens=10,
            do_sample=False, eos_token_id=EOS, pad_token_id=PAD).numpy()[:, ids.shape[1]:]
    out = _text(ck, ids, mask, pixels)
    assert ref.shape[1] == 10 and not (ref == EOS).any()  # no early stop: every token compared
    for g in range(2):
        np.testing.assert_array_equal(np.asarray(out.tokens[:, g]), ref)
    assert np.asarray(out.mask).all() and (np.asarray(out.lengths) == 10).all()


@pytest.mark.parametrize("layout", ["stacked", "interleaved"])
def test_greedy_cfg_images_equal_transformers_generate_image_mode(torch, layout):
    ck = tiny_checkpoint("gqa")
    ids, mask = _image_prompts(4)
    model = ck.model
    model.generation_config.generation_kwargs = {"boi_token_id": BOI}
    model.generation_config.bos_token_id, model.generation_config.pad_token_id = BOS, PAD
    vision_config = model.model.vision_model.config
    saved, vision_config.num_image_tokens = vision_config.num_image_tokens, ck.config.vq.num_tokens
    try:
        with torch.no_grad():
            ref = model.generate(
                input_ids=torch.from_numpy(ids.astype(np.int64)),
                attention_mask=torch.from_numpy(mask.astype(np.int64)),
                generation_mode="image", do_sample=False, guidance_scale=3.0).numpy()
    finally:
        vision_config.num_image_tokens = saved
    out = _images(ck, ids, mask, layout=layout)
    for g in range(2):
        np.testing.assert_array_equal(np.asarray(out.tokens[:, g]), ref)


def test_image_rollout_decodes_pixels():
    ck = tiny_checkpoint("gqa")
    ids, mask = _image_prompts(4)
    out = generate_images(ck.params, ck.config, jnp.asarray(ids), jnp.asarray(mask),
                          jax.random.key(0), 3.0, num_samples=2, sampling=GREEDY, bos_id=BOS,
                          boi_id=BOI, pad_id=PAD)
    size = ck.config.vq.image_size
    assert out.pixels.shape == (4, 2, size, size, 3) and out.pixels.dtype == jnp.uint8
    codes = out.tokens.reshape(8, ck.config.vq.grid, ck.config.vq.grid)
    expected = jax.jit(lambda p, x: janus.pixels_to_uint8(janus.vq_decode(p, ck.config, x)))(
        ck.params, codes)
    np.testing.assert_array_equal(out.pixels.reshape(expected.shape), expected)


def test_decode_steps_over_a_shared_prefix_equal_a_full_forward():
    """Prefill once per prompt, decode G rows per prompt: logits equal janus.forward over the
    whole sequence of each row (left padding included)."""
    ck = tiny_checkpoint("gqa")
    config, params = ck.config, ck.params
    rng = np.random.default_rng(1)
    ids, mask = pad_prompts([[BOS, *rng.integers(4, 250, n)] for n in (3, 7)], PAD, bucket=8)
    b, length, g, steps = 2, ids.shape[1], 3, 5
    new = rng.integers(4, 250, (b, g, steps)).astype(np.int32)
    for layout in (RowLayout((("b", b), ("g", g))), RowLayout((("g", g), ("b", b)))):
        embeds = embed_tokens(params, config, jnp.asarray(ids))
        _, prefill = forward(params, config, embeds, jnp.asarray(mask),
                             janus.init_cache(config, b, length))
        cache = DecodeCache.from_prefill(prefill, layout, steps)
        rows_new = layout.ungroup(jnp.asarray(new))  # [R, steps]
        step = jax.jit(decode_step, static_argnums=1)
        got = []
        for t in range(steps):
            x = embed_tokens(params, config, rows_new[:, t])
            h, cache = step(params, config, x, cache)
            got.append(text_logits(params, config, h))
        got = layout.group(jnp.stack(got, 1))  # [B, G, steps, V]
        full_ids = np.concatenate([np.repeat(ids[:, None], g, 1), new], 2).reshape(b * g, -1)
        full_mask = np.concatenate([np.repeat(mask[:, None], g, 1), np.ones((b, g, steps), bool)],
                                   2).reshape(b * g, -1)
        h, _ = forward(params, config, embed_tokens(params, config, full_ids),
                             jnp.asarray(full_mask))
        want = text_logits(params, config, h[:, length:]).reshape(b, g, steps, -1)
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)


def test_rows_stop_at_eos_and_the_rest_is_padding():
    ck = tiny_checkpoint("gqa")
    ids, mask, pixels = _text_prompts(ck.config, 4)
    free = np.asarray(_text(ck, ids, mask, pixels, eos_id=-1).tokens[:, 0])
    eos = int(free[0, 4])  # row 0 stops at its first occurrence of this token
    stop = int(np.argmax(free[0] == eos))
    out = _text(ck, ids, mask, pixels, eos_id=eos)
    tokens, valid = np.asarray(out.tokens[:, 0]), np.asarray(out.mask[:, 0])
    np.testing.assert_array_equal(tokens[0, :stop + 1], free[0, :stop + 1])
    assert (tokens[0, stop + 1:] == PAD).all() and valid[0].sum() == stop + 1
    assert out.lengths[0, 0] == stop + 1
    assert (np.asarray(out.sample_logprobs[0, 0, stop + 1:]) == 0).all()
    row1_stop = np.flatnonzero(free[1] == eos)
    n1 = row1_stop[0] + 1 if len(row1_stop) else 10
    np.testing.assert_array_equal(tokens[1, :n1], free[1, :n1])
    assert valid[1].sum() == n1


def test_sampled_text_log_probs_equal_teacher_forcing_and_keys_are_deterministic():
    ck = tiny_checkpoint("gqa")
    config, params = ck.config, ck.params
    ids, mask, pixels = _text_prompts(config, 4)
    out = _text(ck, ids, mask, pixels, rng=5, sampling=Sampling(), eos_id=-1)
    again = _text(ck, ids, mask, pixels, rng=5, sampling=Sampling(), eos_id=-1)
    other = _text(ck, ids, mask, pixels, rng=6, sampling=Sampling(), eos_id=-1)
    np.testing.assert_array_equal(out.tokens, again.tokens)
    assert (np.asarray(out.tokens) != np.asarray(other.tokens)).mean() > 0.5
    assert (np.asarray(out.tokens[:, 0]) != np.asarray(out.tokens[:, 1])).any()  # samples differ
    np.testing.assert_allclose(out.sample_logprobs, out.model_logprobs, atol=1e-5)  # T = 1

    b, g, n = out.tokens.shape
    full = np.concatenate([np.repeat(ids[:, None], g, 1), np.asarray(out.tokens)], 2)
    full = full.reshape(b * g, -1)
    full_mask = np.concatenate([np.repeat(mask[:, None], g, 1), np.ones((b, g, n), bool)], 2)
    feats = np.repeat(np.asarray(_jit(janus.image_features)(params, config, pixels)), g, 0)
    in_prompt = np.arange(full.shape[1]) < ids.shape[1]  # sampled ids may equal the image id
    embeds = embed_prompt(params, config, full, feats, (full == IMAGE_TOKEN_ID) & in_prompt)
    h, _ = forward(params, config, embeds, full_mask.reshape(b * g, -1))
    logits = text_logits(params, config, h[:, ids.shape[1] - 1:-1])  # predicts each token
    logp = jnp.take_along_axis(jax.nn.log_softmax(logits), full[:, ids.shape[1]:, None], -1)
    np.testing.assert_allclose(out.model_logprobs.reshape(b * g, n), logp[..., 0], atol=1e-4)


def test_one_cfg_image_step_samples_the_guided_tempered_distribution():
    """Many samples of the first image token vs softmax((u + w (c - u)) / T) from the model."""
    from scipy import stats

    ck = tiny_checkpoint("gqa")
    config, params = ck.config, ck.params
    ids, mask = _image_prompts(1, seed=3)
    w, temperature, draws = 2.0, 1.7, 20_000
    out = _images(ck, ids, mask, rng=1, guidance=w, num_samples=draws, num_tokens=1,
                  sampling=Sampling(temperature=temperature))
    uncond = np.where((ids == BOS) | (ids == BOI), ids, PAD)
    both = np.concatenate([ids, uncond])
    h, _ = forward(params, config, embed_tokens(params, config, both),
                         np.concatenate([mask, mask]))
    c, u = np.asarray(image_logits(params, config, h[:, -1]), np.float64)
    counts = np.bincount(np.asarray(out.tokens).ravel(), minlength=c.shape[0])

    def pvalue(logits):
        p = np.exp(logits - logits.max())
        p /= p.sum()
        keep = p * draws > 5  # pool the rare codes into one bin
        obs, exp = counts[keep], p[keep] * draws
        if not keep.all():
            obs, exp = np.append(obs, counts[~keep].sum()), np.append(exp, p[~keep].sum() * draws)
        return stats.chisquare(obs, exp).pvalue

    assert pvalue((u + w * (c - u)) / temperature) > 1e-4
    for wrong in ((u + w * (c - u)), (u + w * (c - u)) * temperature,
                  (c + w * (c - u)) / temperature, c / temperature,
                  (u + (w + 0.5) * (c - u)) / temperature):
        assert pvalue(wrong) < 1e-8


def test_bucketed_prompt_lengths_reuse_one_compiled_program():
    ck = tiny_checkpoint("gqa")
    rng = np.random.default_rng(0)
    batches = [pad_prompts([[BOS, *rng.integers(4, 250, n), BOI] for n in lens], PAD, bucket=16)
               for lens in ((3, 5), (9, 2), (12, 7), (1, 13))]
    assert {ids.shape for ids, _ in batches} == {(2, 16)}
    key = jax.random.key(0)
    args = [(jnp.asarray(ids), jnp.asarray(mask)) for ids, mask in batches]
    jax.block_until_ready(args)
    compiles = []

    def listener(event, duration, **kw):
        if event == "/jax/core/compile/backend_compile_duration":
            compiles.append(event)

    jax.monitoring.register_event_duration_secs_listener(listener)
    jax.config.update("jax_enable_compilation_cache", False)  # count compiles, not disk loads
    try:
        for ids, mask in args:
            jax.block_until_ready(generate_image_tokens(
                ck.params, ck.config, ids, mask, key, 3.0, num_samples=2, num_tokens=4,
                bos_id=BOS, boi_id=BOI, pad_id=PAD))
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
        jax.config.update("jax_enable_compilation_cache", True)
    assert len(compiles) == 1
    assert bucket_length(1, 16) == 16 and bucket_length(17, 16) == 32


def test_sharded_mesh_gives_the_same_greedy_tokens_as_one_device():
    from pairuni_jax.train import sharding

    assert len(jax.devices()) == 8
    ck = tiny_checkpoint("gqa")
    mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
    params = sharding.shard_params(ck.params, sharding.JANUS_RULES, mesh)
    ids, mask, pixels = _text_prompts(ck.config, 4, seed=2)
    text_one = _text(ck, ids, mask, pixels)
    sharded = sharding.shard_batch((ids, mask, pixels), mesh)
    with sharding.mesh_context(mesh):  # as the loops call it
        text_mesh = generate_text(params, ck.config, *sharded[:2], jax.random.key(0), sharded[2],
                                  num_samples=2, max_new_tokens=10, sampling=GREEDY, eos_id=EOS,
                                  pad_id=PAD, image_token_id=IMAGE_TOKEN_ID)
    assert len(text_mesh.tokens.sharding.device_set) == 8
    np.testing.assert_array_equal(text_one.tokens, text_mesh.tokens)

    ids, mask = _image_prompts(4, seed=2)
    img_one = _images(ck, ids, mask)
    ids_s, mask_s = sharding.shard_batch((ids, mask), mesh)
    with sharding.mesh_context(mesh):
        img_mesh = generate_image_tokens(params, ck.config, ids_s, mask_s, jax.random.key(0),
                                         3.0, num_samples=2, sampling=GREEDY, bos_id=BOS,
                                         boi_id=BOI, pad_id=PAD)
    np.testing.assert_array_equal(img_one.tokens, img_mesh.tokens)


def test_pad_prompts_left_pads_to_the_bucket_and_rejects_bad_input():
    ids, mask = pad_prompts([[5, 6, 7], [8]], PAD, bucket=4)
    np.testing.assert_array_equal(ids, [[0, 5, 6, 7], [0, 0, 0, 8]])
    np.testing.assert_array_equal(mask, [[0, 1, 1, 1], [0, 0, 0, 1]])
    ids2, mask2 = pad_prompts(ids, PAD, mask=mask, bucket=3)
    assert ids2.shape == (2, 6) and mask2[:, :2].sum() == 0 and (ids2[:, 2:] == ids).all()
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        pad_prompts([[1], []], PAD)
    with pytest.raises(ValueError, match="layout"):
        _images(tiny_checkpoint("gqa"), *_image_prompts(1), layout="diagonal")
