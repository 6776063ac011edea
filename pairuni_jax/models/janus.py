"""Janus-Pro, the unified model, as pure functions of an explicit param pytree.

Every function takes `(params, config, ...)`; `config` is a hashable JanusConfig. The functions are
jitted with `config` static (called inside a caller's jitted step they are simply inlined).

    ids, mask                                   # [B, T] int32, [B, T] bool (left padding)
    feats = image_features(params, cfg, pixels)  # [B, N, D]: aligner(vision(pixels [B, S, S, 3]))
    x = embed_prompt(params, cfg, ids, feats, image_mask)      # [B, T, D]
    cache = init_cache(cfg, batch=B, max_len=S_max)
    h, cache = forward(params, cfg, x, mask, cache)            # prefill: h [B, T, D] (final-normed)
    logits = text_logits(params, cfg, h[:, -1])                # [B, V] fp32 (lm_head)
    img_logits = image_logits(params, cfg, h[:, -1])           # [B, K] fp32 (gen_head)
    x1 = image_token_embeds(params, cfg, codes[:, None])       # [B, 1, D]: gen_aligner(gen_embed)
    h, cache = forward(params, cfg, x1, jnp.ones((B, 1), bool), cache)    # one decode step
    codes = vq_encode(params, cfg, pixels)      # [B, h, w];  pixels = vq_decode(params, cfg, codes)

The VQ internals a trainer needs (z before quantisation, the codebook, straight-through pieces) are
methods of `vq.VQModel`, applied to `params["vqmodel"]`, e.g.
`VQModel(config=cfg.vq).apply({"params": params["vqmodel"]}, px, method=VQModel.encode_latents)`.

Param tree (Flax names; `kernel` is [in, out] for Dense, HWIO for Conv; norms have `scale`/`bias`):

    language_model/embed_tokens/embedding                               [V, D]
    language_model/layers_{i}/input_layernorm/scale
    language_model/layers_{i}/self_attn/{q_proj,k_proj,v_proj,o_proj}/kernel
    language_model/layers_{i}/post_attention_layernorm/scale
    language_model/layers_{i}/mlp/{gate_proj,up_proj,down_proj}/kernel
    language_model/norm/scale
    lm_head/kernel                                                      [D, V]
    vision_model/embeddings/patch_embedding/{kernel,bias}
    vision_model/embeddings/position_embedding                          [N, width]
    vision_model/layers_{i}/{layer_norm1,layer_norm2}/{scale,bias}
    vision_model/layers_{i}/self_attn/{q_proj,k_proj,v_proj,projection_layer}/{kernel,bias}
    vision_model/layers_{i}/mlp/{fc1,fc2}/{kernel,bias}
    vision_model/post_layernorm/{scale,bias}
    aligner/{fc1,hidden_layers_0}/{kernel,bias}
    vqmodel/encoder/{conv_in,conv_out,norm_out}/...
    vqmodel/encoder/down_{i}/block_{j}/{norm1,conv1,norm2,conv2,nin_shortcut}/...
    vqmodel/encoder/down_{i}/attn_{j}/{norm,q,k,v,proj_out}/...
    vqmodel/encoder/down_{i}/downsample/conv/...
    vqmodel/encoder/mid/{block_1,attn_1,block_2}/...
    vqmodel/{quant_conv,post_quant_conv}/{kernel,bias}
    vqmodel/quantize/embedding                                          [K, d]
    vqmodel/decoder/... (as encoder, with up_{i} and up_{i}/upsample/conv)
    generation_embeddings/embedding                                     [K, d]
    generation_aligner/{fc1,hidden_layers_0}/{kernel,bias}
    generation_head/{proj_out,vision_head}/{kernel,bias}

Paths mirror transformers' names (`model.language_model.layers.3.self_attn.q_proj.weight` is
`language_model/layers_3/self_attn/q_proj/kernel`), which is how checkpoints.py maps them.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from pairuni_jax.models.configs import JanusConfig
from pairuni_jax.models.llama import KVCache, LlamaModel
from pairuni_jax.models.random_init import random_params
from pairuni_jax.models.siglip import MlpProjector, SigLIPVisionModel, gelu
from pairuni_jax.models.vq import VQModel

Params = dict[str, Any]


def _over_rows(layer, x: jax.Array) -> jax.Array:
    """layer applied to x [..., D] flattened to rows [N, D]: a trainable Dense then has a weight
    gradient that is one plain matrix product (see llama.MLP for why that matters on CPU)."""
    y = layer(x.reshape(-1, x.shape[-1]))
    return y.reshape(*x.shape[:-1], y.shape[-1])


class GenerationHead(nn.Module):
    """Image-token logits from the final-normed LM hidden state: Linear, GELU, Linear."""

    hidden: int
    num_codes: int
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, h: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = gelu(nn.Dense(self.hidden, name="proj_out", **kw)(h))
        return nn.Dense(self.num_codes, name="vision_head", **kw)(h)


class Janus(nn.Module):
    """All Janus-Pro parts; the methods below are wrapped as pure functions at module level."""

    config: JanusConfig

    def setup(self):
        c = self.config
        kw = dict(dtype=c.compute_dtype, param_dtype=c.params_dtype)
        d = c.text.hidden_size
        self.vision_model = SigLIPVisionModel(c.vision, **kw)
        self.aligner = MlpProjector(d, c.aligner_depth, **kw)
        self.vqmodel = VQModel(config=c.vq, **kw)
        self.generation_embeddings = nn.Embed(c.vq.codebook_size, c.vq.codebook_dim, **kw)
        self.generation_aligner = MlpProjector(d, c.gen_aligner_depth, **kw)
        self.generation_head = GenerationHead(c.gen_head_dim, c.vq.codebook_size, **kw)
        self.language_model = LlamaModel(c.text, **kw)
        self.lm_head = nn.Dense(c.text.vocab_size, use_bias=False, **kw)

    def image_features(self, pixels):
        return _over_rows(self.aligner, self.vision_model(pixels))

    def embed_tokens(self, ids):
        return self.language_model.embed(ids)

    def forward(self, embeds, mask, cache):
        return self.language_model(embeds, mask, cache)

    def text_logits(self, h):
        return _over_rows(self.lm_head, h).astype(jnp.float32)

    def image_logits(self, h):
        return _over_rows(self.generation_head, h).astype(jnp.float32)

    def image_token_embeds(self, codes):
        return _over_rows(self.generation_aligner, self.generation_embeddings(codes))

    def vq_encode(self, pixels, normalize):
        return self.vqmodel.encode(pixels, normalize)

    def vq_decode(self, codes):
        return self.vqmodel.decode(codes)

    def __call__(self, ids, pixels, vq_pixels):
        """Touches every parameter (used by init)."""
        feats = self.image_features(pixels)
        h, _ = self.forward(self.embed_tokens(ids) + feats[:, :1], jnp.ones(ids.shape, bool), None)
        codes = self.vq_encode(vq_pixels, True)
        return (self.text_logits(h), self.image_logits(h), self.vq_decode(codes),
                self.image_token_embeds(codes))


def _apply(params: Params, config: JanusConfig, method, *args):
    return Janus(config).apply({"params": params}, *args, method=method)


def _dummy_inputs(config: JanusConfig) -> tuple[jax.Array, ...]:
    v, q = config.vision, config.vq
    return (jnp.zeros((1, 2), jnp.int32),
            jnp.zeros((1, v.image_size, v.image_size, v.num_channels), jnp.float32),
            jnp.zeros((1, q.image_size, q.image_size, q.in_channels), jnp.float32))


def init_params(config: JanusConfig, rng: jax.Array | int = 0) -> Params:
    """Randomly initialised params (tests, the tiny worlds); real weights come from checkpoints.

    Drawn with numpy from the abstract param tree (`random_init.random_params`: no model
    compile). rng: a jax key or an int seed.
    """
    return random_params(param_shapes(config), rng)


def param_shapes(config: JanusConfig) -> Params:
    """The param tree as jax.ShapeDtypeStruct leaves, without allocating anything."""
    return jax.eval_shape(lambda: Janus(config).init(jax.random.key(0), *_dummy_inputs(config)))[
        "params"]


def init_cache(config: JanusConfig, batch: int, max_len: int, dtype=None) -> KVCache:
    """An empty fixed-size KV cache (dtype defaults to the compute dtype)."""
    return KVCache.init(config.text, batch, max_len, dtype or config.compute_dtype)


@functools.partial(jax.jit, static_argnames="config")
def image_features(params: Params, config: JanusConfig, pixels: jax.Array) -> jax.Array:
    """pixels [B, S, S, 3] in [-1, 1] -> aligned image features [B, N, D] (N = 576 for 384/16)."""
    return _apply(params, config, Janus.image_features, pixels)


@functools.partial(jax.jit, static_argnames="config")
def embed_tokens(params: Params, config: JanusConfig, ids: jax.Array) -> jax.Array:
    """Text token embeddings ids [B, T] -> [B, T, D]."""
    return _apply(params, config, Janus.embed_tokens, ids)


@functools.partial(jax.jit, static_argnames="config")
def embed_prompt(params: Params, config: JanusConfig, ids: jax.Array,
                 image_features: jax.Array | None = None,
                 image_mask: jax.Array | None = None) -> jax.Array:
    """Text embeddings with image features written over the image positions -> [B, T, D].

    ids [B, T]; image_mask [B, T] bool marks the `<image_placeholder>` positions; row b's k-th
    marked position receives image_features[b, k] ([B, M, D], M >= marks per row; several images
    per row are concatenated along M). Rows without marks are plain text.
    """
    x = embed_tokens(params, config, ids)
    if image_features is None:
        return x
    if image_mask is None:
        raise ValueError("embed_prompt: image_features given without image_mask")
    return place_image_features(x, image_features, image_mask)


def place_image_features(embeds: jax.Array, image_features: jax.Array,
                         image_mask: jax.Array) -> jax.Array:
    """Write image_features [B, M, D] over the marked positions of embeds [B, T, D]: row b's k-th
    position with image_mask [B, T] True receives image_features[b, k]."""
    slot = jnp.clip(jnp.cumsum(image_mask, axis=1) - 1, 0, image_features.shape[1] - 1)  # [B, T]
    placed = jnp.take_along_axis(image_features.astype(embeds.dtype), slot[..., None], axis=1)
    return jnp.where(image_mask[..., None], placed, embeds)


def forward(params: Params, config: JanusConfig, embeds: jax.Array, mask: jax.Array,
            cache: KVCache | None = None) -> tuple[jax.Array, KVCache | None]:
    """Run the LM on embeds [B, T, D] with key mask [B, T] -> (final-normed hidden, new cache).

    With a cache, the T tokens are written at slot `cache.index` and attend to everything cached.
    Called eagerly, a write past cache.max_len raises; under a caller's jit the index is traced
    and the caller must keep index + T <= max_len (XLA would clamp the write). Without a cache, a
    plain causal forward; the returned cache is None.
    """
    if cache is not None and not isinstance(cache.index, jax.core.Tracer):
        end = int(cache.index) + embeds.shape[1]
        if end > cache.max_len:
            raise ValueError(f"KV cache overflow: writing {embeds.shape[1]} tokens at slot "
                             f"{int(cache.index)} of a cache with {cache.max_len} slots")
    return _forward(params, config, embeds, mask, cache)


@functools.partial(jax.jit, static_argnames="config")
def _forward(params, config, embeds, mask, cache):
    return _apply(params, config, Janus.forward, embeds, mask, cache)


@functools.partial(jax.jit, static_argnames="config")
def text_logits(params: Params, config: JanusConfig, hidden: jax.Array) -> jax.Array:
    """lm_head over final-normed hidden states [..., D] -> fp32 [..., V]."""
    return _apply(params, config, Janus.text_logits, hidden)


@functools.partial(jax.jit, static_argnames="config")
def image_logits(params: Params, config: JanusConfig, hidden: jax.Array) -> jax.Array:
    """gen_head over final-normed hidden states [..., D] -> fp32 [..., K]."""
    return _apply(params, config, Janus.image_logits, hidden)


@functools.partial(jax.jit, static_argnames="config")
def image_token_embeds(params: Params, config: JanusConfig, codes: jax.Array) -> jax.Array:
    """LM input embeddings of image tokens: gen_aligner(gen_embed(codes)) [...] -> [..., D]."""
    return _apply(params, config, Janus.image_token_embeds, codes)


@functools.partial(jax.jit, static_argnames=("config", "normalize"))
def vq_encode(params: Params, config: JanusConfig, pixels: jax.Array,
              normalize: bool = True) -> jax.Array:
    """pixels [B, H, W, 3] in [-1, 1] -> codes [B, h, w]; normalize=False = transformers' encode."""
    return _apply(params, config, Janus.vq_encode, pixels, normalize)


@functools.partial(jax.jit, static_argnames="config")
def vq_decode(params: Params, config: JanusConfig, codes: jax.Array) -> jax.Array:
    """codes [B, h, w] -> pixels [B, H, W, 3] in about [-1, 1] (clip before converting to uint8)."""
    return _apply(params, config, Janus.vq_decode, codes)


def pixels_to_uint8(pixels: jax.Array) -> jax.Array:
    """[-1, 1] floats -> uint8, as the reference: clip((x + 1) / 2 * 255)."""
    return jnp.clip((pixels.astype(jnp.float32) + 1.0) * 127.5, 0, 255).astype(jnp.uint8)
