"""VQ image tokenizer of Janus (LlamaGen VQ-16 architecture, any number of levels).

Encoder: conv_in, levels `down_{i}` of ResBlocks (`block_{j}`) with single-head AttnBlocks
(`attn_{j}`) at the last level only, a stride-2 `downsample` (pad right/bottom by 1, 3x3 VALID conv)
after every level but the last, mid (block_1, attn_1, block_2), GroupNorm, swish, conv_out;
`quant_conv` 1x1 to the codebook dim. Quantizer: L2-normalise z and the codebook, nearest code
(the original behaviour; `normalize=False` reproduces transformers, which skips normalising z).
Decoder: post_quant_conv, conv_in, mid, levels `up_{i}` (channels reversed) with AttnBlocks at
the first level only, nearest x2 upsample + 3x3 conv after every level but the last, norm, swish,
conv_out.

Images are NHWC in [-1, 1]. The pieces a trainer needs are exposed on `VQModel`:
`encode_latents` (z before quantisation), `codebook` (normalised table), `quantize`,
`decode_latents` (decoder from quantised latents).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from pairuni_jax.models.configs import VQConfig
from pairuni_jax.models.partitioning import shard_rows
from pairuni_jax.models.random_init import random_params


class _Common(nn.Module):
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    def conv(self, features: int, size: int, name: str, stride: int = 1, pad: bool = True):
        padding = ((size // 2, size // 2),) * 2 if pad else "VALID"
        return nn.Conv(features, (size, size), strides=(stride, stride), padding=padding,
                       dtype=self.dtype, param_dtype=self.param_dtype, name=name)

    def norm(self, name: str, groups: int):
        return nn.GroupNorm(num_groups=groups, epsilon=1e-6, dtype=self.dtype,
                            param_dtype=self.param_dtype, use_fast_variance=False, name=name)


class ResnetBlock(_Common):
    out_channels: int = 0
    groups: int = 32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h = nn.swish(self.norm("norm1", self.groups)(x))
        h = self.conv(self.out_channels, 3, "conv1")(h)
        h = nn.swish(self.norm("norm2", self.groups)(h))
        h = self.conv(self.out_channels, 3, "conv2")(h)
        if x.shape[-1] != self.out_channels:
            x = self.conv(self.out_channels, 1, "nin_shortcut")(x)
        return x + h


class AttnBlock(_Common):
    groups: int = 32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, hgt, wid, c = x.shape
        h = self.norm("norm", self.groups)(x)
        q, k, v = (self.conv(c, 1, n)(h).reshape(b, hgt * wid, c) for n in ("q", "k", "v"))
        scores = jnp.einsum("bqc,bkc->bqk", q, k, preferred_element_type=jnp.float32) * c**-0.5
        probs = jax.nn.softmax(scores, axis=-1).astype(self.dtype)
        out = jnp.einsum("bqk,bkc->bqc", probs, v).reshape(b, hgt, wid, c)
        return x + self.conv(c, 1, "proj_out")(out)


class MidBlock(_Common):
    groups: int = 32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, groups=self.groups)
        c = x.shape[-1]
        x = ResnetBlock(out_channels=c, name="block_1", **kw)(x)
        x = AttnBlock(name="attn_1", **kw)(x)
        return ResnetBlock(out_channels=c, name="block_2", **kw)(x)


class Downsample(_Common):
    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
        return self.conv(x.shape[-1], 3, "conv", stride=2, pad=False)(x)


class Upsample(_Common):
    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)  # nearest x2
        return self.conv(x.shape[-1], 3, "conv")(x)


class Level(_Common):
    """One resolution level: ResBlocks `block_{j}`, optional AttnBlocks `attn_{j}`, resampler."""

    out_channels: int = 0
    num_blocks: int = 2
    with_attn: bool = False
    resample: str = ""  # "", "downsample" or "upsample"
    groups: int = 32

    def setup(self):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, groups=self.groups)
        self.block = [ResnetBlock(out_channels=self.out_channels, **kw)
                      for _ in range(self.num_blocks)]
        self.attn = [AttnBlock(**kw) for _ in range(self.num_blocks if self.with_attn else 0)]
        kw.pop("groups")
        if self.resample == "downsample":
            self.downsample = Downsample(**kw)
        elif self.resample == "upsample":
            self.upsample = Upsample(**kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        for j, block in enumerate(self.block):
            x = block(x)
            if self.attn:
                x = self.attn[j](x)
        if self.resample == "downsample":
            x = self.downsample(x)
        elif self.resample == "upsample":
            x = self.upsample(x)
        return x


class Encoder(_Common):
    config: VQConfig = VQConfig()

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        n = len(c.ch_mult)
        x = shard_rows(self.conv(c.ch, 3, "conv_in")(shard_rows(x)))
        for i, mult in enumerate(c.ch_mult):
            x = shard_rows(Level(
                out_channels=c.ch * mult, num_blocks=c.num_res_blocks, with_attn=i == n - 1,
                resample="downsample" if i < n - 1 else "", groups=c.num_groups,
                name=f"down_{i}", **kw)(x))
        x = shard_rows(MidBlock(groups=c.num_groups, name="mid", **kw)(x))
        x = nn.swish(self.norm("norm_out", c.num_groups)(x))
        return shard_rows(self.conv(c.z_channels, 3, "conv_out")(x))


class Decoder(_Common):
    config: VQConfig = VQConfig()

    @nn.compact
    def __call__(self, z: jax.Array) -> jax.Array:
        c = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        n = len(c.ch_mult)
        x = shard_rows(self.conv(c.ch * c.ch_mult[-1], 3, "conv_in")(shard_rows(z)))
        x = shard_rows(MidBlock(groups=c.num_groups, name="mid", **kw)(x))
        for i, mult in enumerate(reversed(c.ch_mult)):
            x = shard_rows(Level(
                out_channels=c.ch * mult, num_blocks=c.num_res_blocks + 1, with_attn=i == 0,
                resample="upsample" if i < n - 1 else "", groups=c.num_groups,
                name=f"up_{i}", **kw)(x))
        x = nn.swish(self.norm("norm_out", c.num_groups)(x))
        return shard_rows(self.conv(c.out_channels, 3, "conv_out")(x))


def l2_normalize(x: jax.Array, axis: int = -1, eps: float = 1e-12) -> jax.Array:
    """x / max(||x||, eps), as torch.nn.functional.normalize."""
    norm = jnp.sqrt(jnp.sum(jnp.square(x.astype(jnp.float32)), axis=axis, keepdims=True))
    return (x / jnp.maximum(norm, eps)).astype(x.dtype)


def nearest_code(z: jax.Array, codebook: jax.Array) -> jax.Array:
    """Index of the nearest codebook row (squared L2) for z [..., d], codebook [K, d] -> [...]."""
    zf, cb = z.astype(jnp.float32), codebook.astype(jnp.float32)
    dist = (jnp.sum(zf * zf, -1, keepdims=True) + jnp.sum(cb * cb, -1)
            - 2.0 * jnp.einsum("...d,kd->...k", zf, cb))
    return jnp.argmin(dist, axis=-1).astype(jnp.int32)


class VQModel(_Common):
    """`encoder`, `quant_conv`, `quantize/embedding` [K, d], `post_quant_conv`, `decoder`."""

    config: VQConfig = VQConfig()

    def setup(self):
        c, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.encoder = Encoder(config=c, **kw)
        self.quant_conv = nn.Conv(c.codebook_dim, (1, 1), **kw)
        self.quantize = Codebook(c.codebook_size, c.codebook_dim, param_dtype=self.param_dtype)
        self.post_quant_conv = nn.Conv(c.z_channels, (1, 1), **kw)
        self.decoder = Decoder(config=c, **kw)

    def encode_latents(self, pixels: jax.Array) -> jax.Array:
        """pixels [B, H, W, 3] -> z before quantisation [B, h, w, d] (not normalised)."""
        return self.quant_conv(self.encoder(pixels.astype(self.dtype)))

    def codebook(self, normalize: bool = True) -> jax.Array:
        """The code table [K, d], L2-normalised rows unless normalize=False."""
        table = self.quantize.embedding
        return l2_normalize(table) if normalize else table

    def quantize_latents(self, z: jax.Array, normalize: bool = True) -> tuple[jax.Array, jax.Array]:
        """z [B, h, w, d] -> (codes [B, h, w], quantised latents [B, h, w, d] from the table).

        normalize=True (original): argmin over L2-normalised z and codebook, normalised rows out.
        normalize=False (transformers' encode): raw z against the raw table.
        """
        table = self.codebook(normalize)
        codes = nearest_code(l2_normalize(z) if normalize else z, table)
        return codes, table[codes].astype(self.dtype)

    def encode(self, pixels: jax.Array, normalize: bool = True) -> jax.Array:
        """pixels [B, H, W, 3] in [-1, 1] -> codes [B, h, w] int32."""
        return self.quantize_latents(self.encode_latents(pixels), normalize)[0]

    def decode_latents(self, zq: jax.Array) -> jax.Array:
        """Quantised latents [B, h, w, d] -> pixels [B, H, W, 3] (about [-1, 1], not clipped)."""
        return self.decoder(self.post_quant_conv(zq.astype(self.dtype)))

    def decode(self, codes: jax.Array) -> jax.Array:
        """codes [B, h, w] -> pixels [B, H, W, 3]; rows looked up in the normalised codebook."""
        return self.decode_latents(self.codebook(True)[codes])

    def __call__(self, pixels: jax.Array) -> jax.Array:
        """Reconstruction (used to initialise every parameter)."""
        return self.decode(self.encode(pixels))


class Codebook(nn.Module):
    size: int
    dim: int
    param_dtype: jnp.dtype = jnp.float32

    def setup(self):
        self.embedding = self.param("embedding", nn.initializers.normal(1.0 / self.size),
                                    (self.size, self.dim), self.param_dtype)


def init_params(config: VQConfig, rng: jax.Array | int = 0) -> dict:
    """Variables {"params": ...} of `VQModel(config=config)`, drawn with numpy (no compile)."""
    pixels = jax.ShapeDtypeStruct((1, config.image_size, config.image_size, config.in_channels),
                                  jnp.float32)
    shapes = jax.eval_shape(VQModel(config=config).init, jax.random.key(0), pixels)
    return {"params": random_params(shapes["params"], rng)}
