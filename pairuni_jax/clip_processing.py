"""CLIP inputs: image preprocessing in JAX (on the accelerator), open_clip-equivalent tokenisation.

Images: open_clip's eval transform (resize the shortest side to `image_size` with bicubic
interpolation, centre crop, normalise by the CLIP mean/std) written as jnp ops, so decoded rollout
images never leave the device. The resize is separable with Keys' cubic kernel (a = -0.5)
widened by the scale when downsampling, weights computed in float32 and each row normalised:
the kernel of torch's `interpolate(mode="bicubic", antialias=True)` (what HPSv2's tensor-space
transform runs; we match it to ~2e-6 of a normalised pixel), of `jax.image.resize(bicubic,
antialias)`, and of PIL's BICUBIC (open_clip 3.x resizes PIL images, which also rounds to uint8:
~0.3/255 mean, a few /255 max difference). Only the non-zero band of the weights is multiplied.

Text: open_clip's SimpleTokenizer is the OpenAI CLIP byte-level BPE (49408 ids; sot 49406,
eot 49407; 77 positions, zero padded; overlong text truncated with eot kept last). transformers'
`CLIPTokenizer` (Rust `tokenizers` BPE) implements the same BPE; we build it from open_clip's own
merges file `bpe_simple_vocab_16e6.txt.gz` (or load a transformers tokenizer directory), apply
open_clip's text cleaning (ftfy when installed, double html unescape, whitespace collapse,
lower case) first, and frame/pad the ids exactly as open_clip does.
"""

from __future__ import annotations

import functools
import gzip
import html
import importlib.util
import os
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# open_clip keeps the first 49152 - 256 - 2 merges of the file (line 0 is a version header).
_NUM_MERGES = 49152 - 256 - 2
# open_clip's names for the special tokens (transformers: <|startoftext|>, <|endoftext|>)
SOT_TOKEN, EOT_TOKEN = "<start_of_text>", "<end_of_text>"
# open_clip's pre-tokenisation pattern (its special tokens, contractions, letters, single digits,
# other non-space runs), applied case-insensitively; the text is lower-cased first anyway.
_OPEN_CLIP_SPLIT = (
    r"<start_of_text>|<end_of_text>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"
)


# -- images ----------------------------------------------------------------------------------

def resized_shape(height: int, width: int, size: int) -> tuple[int, int]:
    """Shortest side -> `size`, long side int(size * long / short) (torchvision's Resize(int))."""
    if height <= width:
        return size, int(size * width / height)
    return int(size * height / width), size


def _keys_cubic(x: np.ndarray) -> np.ndarray:
    """Keys' cubic convolution kernel, a = -0.5 (PIL, torch antialias, jax.image), at |x|."""
    near = ((1.5 * x - 2.5) * x) * x + 1
    far = ((-0.5 * x + 2.5) * x - 4) * x + 2
    return np.where(x < 1, near, np.where(x < 2, far, 0))


@functools.lru_cache(maxsize=64)
def _resize_matrix(n_in: int, n_out: int) -> np.ndarray:
    """[n_out, n_in] weights of an antialiased bicubic resize along one axis: output pixel
    centres mapped back to the input, the kernel widened by the scale when downsampling,
    each row normalised to sum 1. Computed once per size pair, in numpy at trace time."""
    f32 = np.float32  # in float32 like the references (torch, jax.image): closer agreement
    inv_scale = f32(n_in) / f32(n_out)
    width = max(inv_scale, f32(1))
    centres = (np.arange(n_out, dtype=f32) + f32(0.5)) * inv_scale - f32(0.5)  # [n_out]
    offsets = np.abs(centres[:, None] - np.arange(n_in, dtype=f32)[None, :]) / width
    w = _keys_cubic(offsets).astype(f32)  # [n_out, n_in]
    return w / w.sum(axis=1, keepdims=True)


def _resize_crop_axis(x: jax.Array, axis: int, n_out: int, keep: tuple[int, int]) -> jax.Array:
    """Resize one axis to n_out as jax.image.resize does and keep rows [keep[0], keep[1]).

    Only the band of the weight matrix that is non-zero is multiplied: output rows in blocks of
    32, each against the input slice its kernels touch (~7x fewer flops than the dense
    [n_out, n_in] product for 384 -> 224), and rows the centre crop drops are never computed.
    """
    n_in = x.shape[axis]
    if n_in == n_out:
        return jax.lax.slice_in_dim(x, keep[0], keep[1], axis=axis)
    weights = _resize_matrix(n_in, n_out)[keep[0] : keep[1]]
    parts = []
    for start in range(0, len(weights), 32):
        w = weights[start : start + 32]  # [block, n_in]
        touched = np.flatnonzero(np.abs(w).sum(axis=0))
        lo, hi = int(touched[0]), int(touched[-1]) + 1
        xs = jax.lax.slice_in_dim(x, lo, hi, axis=axis)
        y = jnp.tensordot(w[:, lo:hi], xs, axes=[[1], [axis]], precision="highest")
        parts.append(jnp.moveaxis(y, 0, axis))
    return jnp.concatenate(parts, axis=axis)


def to_unit_range(images: jax.Array) -> jax.Array:
    """uint8 [0, 255] or float [-1, 1] images -> float32 in [0, 1].

    Floats are clipped to [-1, 1] first: that is what saving the decoded image as uint8 does.
    """
    if images.dtype == jnp.uint8:
        return images.astype(jnp.float32) / 255.0
    if not jnp.issubdtype(images.dtype, jnp.floating):
        raise TypeError(f"images: expected uint8 or float [-1, 1] pixels, got {images.dtype}")
    return (jnp.clip(images.astype(jnp.float32), -1.0, 1.0) + 1.0) / 2.0


def preprocess_images(
    images: jax.Array,
    image_size: int = 224,
    mean: Sequence[float] = OPENAI_CLIP_MEAN,
    std: Sequence[float] = OPENAI_CLIP_STD,
) -> jax.Array:
    """Decoded images [B, H, W, 3] (uint8, or float in [-1, 1]) -> CLIP input [B, S, S, 3] fp32.

    Jittable; shapes are static so the resize/crop geometry is fixed at trace time.
    """
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"images: expected [B, H, W, 3], got shape {images.shape}")
    b, h, w, _ = images.shape
    x = to_unit_range(images)
    nh, nw = resized_shape(h, w, image_size)
    top = int(round((nh - image_size) / 2.0))  # torchvision CenterCrop offsets
    left = int(round((nw - image_size) / 2.0))
    x = _resize_crop_axis(x, 1, nh, (top, top + image_size))
    x = _resize_crop_axis(x, 2, nw, (left, left + image_size))
    return (x - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)


# -- text ------------------------------------------------------------------------------------

def _bytes_to_unicode() -> dict[int, str]:
    """The byte -> printable-character table of byte-level BPE (GPT-2 / CLIP)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    keep += list(range(ord("®"), ord("ÿ") + 1))
    chars = keep[:]
    n = 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(keep, chars, strict=True)}


def vocab_from_merges(merges: Sequence[tuple[str, str]]) -> dict[str, int]:
    """CLIP's vocabulary order: 256 byte chars, the same with '</w>', one entry per merge,
    then sot and eot (49406, 49407 with the full merges file)."""
    base = list(_bytes_to_unicode().values())
    tokens = base + [c + "</w>" for c in base] + ["".join(m) for m in merges]
    tokens += [SOT_TOKEN, EOT_TOKEN]
    return {t: i for i, t in enumerate(tokens)}


def read_bpe_merges(path: str) -> list[tuple[str, str]]:
    """Merges from open_clip's `bpe_simple_vocab_16e6.txt[.gz]`, truncated as open_clip does."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    if lines and lines[-1] == "":
        lines.pop()  # the file's final newline
    merges = []
    for lineno, line in enumerate(lines[1 : _NUM_MERGES + 1], start=2):
        parts = line.split()
        if len(parts) != 2:
            raise ValueError(f"{path}:{lineno}: expected a merge 'a b', got {line!r}")
        merges.append((parts[0], parts[1]))
    return merges


def tokenizer_from_merges(merges: Sequence[tuple[str, str]]):
    """A transformers CLIPTokenizer over CLIP's byte-level BPE with these merges, with open_clip's
    special-token names and split pattern (so even a literal "<|endoftext|>" in a prompt is
    tokenised as open_clip does)."""
    from tokenizers import Regex, pre_tokenizers
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer(
        vocab=vocab_from_merges(merges), merges=[tuple(m) for m in merges],
        bos_token=SOT_TOKEN, eos_token=EOT_TOKEN, unk_token=EOT_TOKEN, pad_token=EOT_TOKEN,
    )
    tok.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_OPEN_CLIP_SPLIT), behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False),
    ])
    return tok


def open_clip_bpe_path() -> str | None:
    """The merges file shipped inside an installed open_clip_torch (found without importing it)."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = os.path.join(spec.submodule_search_locations[0], "bpe_simple_vocab_16e6.txt.gz")
    return path if os.path.isfile(path) else None


def load_tokenizer(path: str | None = None):
    """CLIP tokenizer from an open_clip merges file, a transformers tokenizer directory, or
    (path None) the merges file of an installed open_clip_torch."""
    path = path or open_clip_bpe_path()
    if path is None:
        raise FileNotFoundError(
            "no CLIP tokenizer given: pass open_clip's bpe_simple_vocab_16e6.txt.gz (inside the "
            "open_clip_torch wheel) or a transformers CLIP tokenizer directory"
        )
    if os.path.isdir(path):
        from transformers import CLIPTokenizer

        return CLIPTokenizer.from_pretrained(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such CLIP tokenizer file or directory")
    return tokenizer_from_merges(read_bpe_merges(path))


def clean_text(text: str) -> str:
    """open_clip's 'lower' cleaning: ftfy (if installed), html unescape x2, whitespace, lower."""
    try:
        import ftfy

        text = ftfy.fix_text(text)
    except ImportError:
        pass
    text = html.unescape(html.unescape(text)).strip()
    return " ".join(text.split()).lower()


def tokenize(tokenizer, texts: Sequence[str], context_length: int = 77) -> np.ndarray:
    """Texts -> ids [B, context_length] int32: sot, BPE ids, eot, zeros; truncated with eot last."""
    if isinstance(texts, str):
        raise TypeError("tokenize: pass a list of texts, not one string")
    sot, eot = tokenizer.bos_token_id, tokenizer.eos_token_id
    body = tokenizer([clean_text(t) for t in texts], add_special_tokens=False)["input_ids"]
    out = np.zeros((len(texts), context_length), np.int32)
    for i, ids in enumerate(body):
        row = [sot, *ids, eot][:context_length]
        row[-1] = eot
        out[i, : len(row)] = row
    return out
