"""Numerical parity with transformers' PyTorch JanusForConditionalGeneration (CPU, fp32).

Two tiny random checkpoints (tests/janus_tiny.py): "gqa" (grouped KV heads, 2-level VQ) and "deep"
(3-level VQ with attention blocks, aligner depth 3). Tolerance: max abs error <= 1e-4.
"""

import jax.numpy as jnp
import numpy as np
import pytest

from pairuni_jax.models import janus
from tests.janus_tiny import IMAGE_TOKEN_ID, KINDS, tiny_checkpoint

TOL = 1e-4


@pytest.fixture(params=KINDS, scope="module")
def tiny(request, torch):
    return tiny_checkpoint(request.param)


def _max_err(ours, ref) -> float:
    ours, ref = np.asarray(ours, np.float32), np.asarray(ref, np.float32)
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    return float(np.max(np.abs(ours - ref)))


def _text_ids(batch: int, length: int, seed: int = 0) -> np.ndarray:
    return np.random.RandomState(seed).randint(3, IMAGE_TOKEN_ID - 1, size=(batch, length))


def _pixels(tiny, batch: int, size: int, seed: int = 0) -> np.ndarray:
    return np.random.RandomState(seed).uniform(-1, 1, (batch, size, size, 3)).astype(np.float32)


def _nchw(torch, x: np.ndarray):
    return torch.tensor(x).permute(0, 3, 1, 2)


def test_text_logits_text_only(tiny, torch):
    ids = _text_ids(2, 11)
    with torch.no_grad():
        ref = tiny.model(input_ids=torch.tensor(ids)).logits.numpy()
    p, c = tiny.params, tiny.config
    x = janus.embed_prompt(p, c, jnp.asarray(ids))
    h, _ = janus.forward(p, c, x, jnp.ones(ids.shape, bool))
    err = _max_err(janus.text_logits(p, c, h), ref)
    print(f"[{tiny.config.vq.ch_mult}] text-only logits max abs err {err:.2e}")
    assert err <= TOL and np.abs(ref).max() > 1.0


def test_text_logits_with_image(tiny, torch):
    p, c = tiny.params, tiny.config
    n = c.vision.num_tokens
    ids = _text_ids(2, 4 + n + 3)
    ids[:, 4:4 + n] = IMAGE_TOKEN_ID
    px = _pixels(tiny, 2, c.vision.image_size)
    with torch.no_grad():
        ref = tiny.model(input_ids=torch.tensor(ids), pixel_values=_nchw(torch, px)).logits.numpy()
    feats = janus.image_features(p, c, jnp.asarray(px))
    x = janus.embed_prompt(p, c, jnp.asarray(ids), feats, jnp.asarray(ids == IMAGE_TOKEN_ID))
    h, _ = janus.forward(p, c, x, jnp.ones(ids.shape, bool))
    err = _max_err(janus.text_logits(p, c, h), ref)
    print(f"[{c.vq.ch_mult}] image+text logits max abs err {err:.2e}")
    assert err <= TOL


def test_vision_features_after_aligner(tiny, torch):
    p, c = tiny.params, tiny.config
    px = _pixels(tiny, 2, c.vision.image_size, seed=1)
    with torch.no_grad():
        ref = tiny.model.model.get_image_features(_nchw(torch, px)).pooler_output.numpy()
    err = _max_err(janus.image_features(p, c, jnp.asarray(px)), ref)
    print(f"[{c.vq.ch_mult}] vision features max abs err {err:.2e}")
    assert err <= TOL


def test_vq_decode_pixels(tiny, torch):
    p, c = tiny.params, tiny.config
    g = c.vq.grid
    codes = np.random.RandomState(2).randint(0, c.vq.codebook_size, size=(2, g, g))
    with torch.no_grad():
        ref = tiny.model.model.vqmodel.decode(torch.tensor(codes.reshape(2, -1)))
    ref = ref.permute(0, 2, 3, 1).numpy()
    err = _max_err(janus.vq_decode(p, c, jnp.asarray(codes)), ref)
    print(f"[{c.vq.ch_mult}] VQ decode max abs err {err:.2e}")
    assert err <= TOL


def test_vq_encode_codes_identical_with_transformers_switch(tiny, torch):
    p, c = tiny.params, tiny.config
    px = _pixels(tiny, 3, c.vq.image_size, seed=3)
    with torch.no_grad():
        ref = tiny.model.model.vqmodel.encode(_nchw(torch, px)).image_tokens.numpy()
    ours = np.asarray(janus.vq_encode(p, c, jnp.asarray(px), normalize=False))
    assert ours.shape == (3, c.vq.grid, c.vq.grid)
    np.testing.assert_array_equal(ours.reshape(-1), ref)
    assert len(np.unique(ref)) > 4  # a real test: many different codes


def test_gen_head_logits(tiny, torch):
    p, c = tiny.params, tiny.config
    h = np.random.RandomState(4).normal(size=(2, 5, c.text.hidden_size)).astype(np.float32)
    with torch.no_grad():
        ref = tiny.model.model.generation_head(torch.tensor(h)).numpy()
    err = _max_err(janus.image_logits(p, c, jnp.asarray(h)), ref)
    print(f"[{c.vq.ch_mult}] gen_head logits max abs err {err:.2e}")
    assert err <= TOL


def test_image_token_input_embeddings(tiny, torch):
    p, c = tiny.params, tiny.config
    codes = np.random.RandomState(5).randint(0, c.vq.codebook_size, size=(2, 7))
    with torch.no_grad():
        ref = tiny.model.prepare_embeddings_for_image_generation(torch.tensor(codes)).numpy()
    err = _max_err(janus.image_token_embeds(p, c, jnp.asarray(codes)), ref)
    print(f"[{c.vq.ch_mult}] image-token embeddings max abs err {err:.2e}")
    assert err <= TOL


def test_left_padded_batch_and_cached_decode_match_transformers(tiny, torch):
    """A left-padded batch: prefill + single-token cached steps == transformers' full forward."""
    p, c = tiny.params, tiny.config
    ids = _text_ids(3, 12, seed=6)
    mask = np.ones_like(ids, bool)
    mask[1, :4] = False  # left padding
    mask[2, :7] = False
    ids[~mask] = 0
    position_ids = np.clip(np.cumsum(mask, 1) - 1, 0, None)
    with torch.no_grad():
        ref = tiny.model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask.astype(int)),
                         position_ids=torch.tensor(position_ids)).logits.numpy()

    x = janus.embed_prompt(p, c, jnp.asarray(ids))
    prefill = 8
    cache = janus.init_cache(c, batch=3, max_len=16)
    h, cache = janus.forward(p, c, x[:, :prefill], jnp.asarray(mask[:, :prefill]), cache)
    steps = [h]
    for t in range(prefill, ids.shape[1]):
        h, cache = janus.forward(p, c, x[:, t:t + 1], jnp.asarray(mask[:, t:t + 1]), cache)
        steps.append(h)
    assert int(cache.index) == ids.shape[1]
    ours = np.asarray(janus.text_logits(p, c, jnp.concatenate(steps, axis=1)))
    err = _max_err(ours[mask], ref[mask])
    print(f"[{c.vq.ch_mult}] left-padded cached decode vs transformers max abs err {err:.2e}")
    assert err <= TOL
