"""CLIP in Flax against the PyTorch references: transformers' CLIPModel and open_clip's CLIP.

References run for real with tiny random configs (fp32): transformers' CLIPModel saved with
save_pretrained and read back by `load_hf_clip`; open_clip's own CLIP module (open_clip_torch)
whose state dict is torch.save'd the way HPSv2 ships it and read by `load_open_clip`.
Preprocessing is compared with torch's antialiased bicubic interpolate (HPSv2's transform) and PIL;
tokenisation with open_clip's SimpleTokenizer on its real vocabulary and on a locally built one.
"""

from __future__ import annotations

import functools
import gzip
import importlib
import importlib.util
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from reference import missing_reference

from pairuni_jax import clip_checkpoints, clip_processing
from pairuni_jax.models import clip

TOL = 1e-4  # max abs error allowed on features (fp32)
# our config of `tiny_hf_model`'s towers (MLP 2x), for its weights under open_clip names
HF_TINY_AS_OPEN_CLIP = clip.tiny(vocab_size=99, vision_mlp_dim=64, text_mlp_dim=48)


# -- references --------------------------------------------------------------------------------

def tiny_hf_model(torch, act="gelu", eos_token_id=98, seed=0, vocab_size=99):
    import transformers

    torch.manual_seed(seed)
    cfg = transformers.CLIPConfig(
        text_config=dict(
            vocab_size=vocab_size, hidden_size=24, intermediate_size=48, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=16, hidden_act=act,
            eos_token_id=eos_token_id, bos_token_id=97, pad_token_id=0,
        ),
        vision_config=dict(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            image_size=32, patch_size=8, hidden_act=act,
        ),
        projection_dim=16,
    )
    model = transformers.CLIPModel(cfg).eval()
    with torch.no_grad():  # make LayerNorms and biases non-trivial so a wrong mapping shows
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    return model


def open_clip_module(torch):
    """open_clip.model, imported without open_clip/__init__ (its transforms need torchvision,
    whose PyPI build does not load beside this torch). `open_clip.utils` imports one name from
    torchvision.ops (FrozenBatchNorm2d, used only to freeze ResNets); a placeholder stands in for
    it during the import and is removed right after, so nothing else sees it."""
    if "open_clip.model" in sys.modules:
        return sys.modules["open_clip.model"]
    spec = importlib.util.find_spec("open_clip")
    if spec is None:
        missing_reference("open_clip_torch", "pip install --no-deps -r requirements-ref.txt")
    # resolve transformers' lazy imports and optional-package checks before the shim exists
    from transformers import AutoConfig, AutoModel, AutoTokenizer  # noqa: F401

    shim = {}
    if importlib.util.find_spec("torchvision") is None:
        misc = types.ModuleType("torchvision.ops.misc")
        misc.FrozenBatchNorm2d = type("FrozenBatchNorm2d", (torch.nn.Module,), {})
        shim = {
            "torchvision": types.ModuleType("torchvision"),
            "torchvision.ops": types.ModuleType("torchvision.ops"),
            "torchvision.ops.misc": misc,
        }
    package = types.ModuleType("open_clip")
    package.__path__ = list(spec.submodule_search_locations)
    package.__spec__ = spec
    sys.modules.update(shim)
    sys.modules.setdefault("open_clip", package)
    try:
        return importlib.import_module("open_clip.model")
    finally:
        for name in shim:
            sys.modules.pop(name, None)


def tiny_open_clip_model(torch, seed=0, vocab_size=99):
    oc = open_clip_module(torch)
    torch.manual_seed(seed)
    model = oc.CLIP(
        embed_dim=16,
        vision_cfg=dict(image_size=32, layers=2, width=32, head_width=8, patch_size=8),
        text_cfg=dict(context_length=16, vocab_size=vocab_size, width=24, heads=4, layers=2),
    ).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


def random_ids(rng, batch=4, length=16, eot=98):
    """sot, random body, eot (the largest id), zero padding; one row fills the context."""
    ids = np.zeros((batch, length), np.int64)
    for i, n in enumerate([3, 7, 1, length - 2][:batch]):
        ids[i, 0] = 97
        ids[i, 1 : 1 + n] = rng.integers(1, 97, n)
        ids[i, 1 + n] = eot
    return ids


def to_nhwc(t):
    return jnp.asarray(t.permute(0, 2, 3, 1).numpy())


@functools.partial(jax.jit, static_argnums=0)
def _encode(config, params, pixels, ids):
    net = clip.CLIP(config)
    img = net.apply({"params": params}, pixels, method=clip.CLIP.encode_image)
    return img, net.apply({"params": params}, ids, method=clip.CLIP.encode_text)


def encode(config, params, pixels, ids):
    """Unnormalised (image, text) features; jitted once per config (not op-by-op dispatch)."""
    img, txt = _encode(config, params, jnp.asarray(pixels), jnp.asarray(ids))
    return np.asarray(img), np.asarray(txt)


paired_similarity = jax.jit(clip.paired_similarity, static_argnums=0)


# -- model parity ------------------------------------------------------------------------------

# (exact GELU, eos id 98: pool at the first eos) and, like OpenAI's exports, (quick_gelu, the
# legacy eos id 2: transformers pools at argmax(ids))
@pytest.mark.parametrize("act, eos_id", [("gelu", 98), ("quick_gelu", 2)])
def test_features_match_transformers_clip(torch, tmp_path, act, eos_id):
    model = tiny_hf_model(torch, act=act, eos_token_id=eos_id)
    model.save_pretrained(tmp_path)
    config, params = clip_checkpoints.load_hf_clip(str(tmp_path))
    assert config.act == act and config.eos_id == (None if eos_id == 2 else eos_id)

    rng = np.random.default_rng(0)
    pixels = torch.from_numpy(rng.standard_normal((3, 3, 32, 32)).astype(np.float32))
    ids = torch.from_numpy(random_ids(rng))
    with torch.no_grad():
        ref_img = model.get_image_features(pixel_values=pixels).pooler_output.numpy()
        ref_txt = model.get_text_features(input_ids=ids).pooler_output.numpy()
    img, txt = encode(config, params, to_nhwc(pixels), ids.numpy())
    assert np.abs(img - ref_img).max() < TOL
    assert np.abs(txt - ref_txt).max() < TOL

    # the score: diagonal of normalised image @ text.T (first 3 texts pair with the 3 images)
    ref_n = ref_img / np.linalg.norm(ref_img, axis=-1, keepdims=True)
    txt_n = ref_txt / np.linalg.norm(ref_txt, axis=-1, keepdims=True)
    ref_scores = np.diag(ref_n @ txt_n[:3].T)
    ours = paired_similarity(
        config, params, to_nhwc(pixels), jnp.asarray(ids.numpy()[:3])
    )
    assert np.abs(np.asarray(ours) - ref_scores).max() < 1e-5
    ref_scale = float(model.logit_scale.detach())
    np.testing.assert_allclose(float(params["logit_scale"]), ref_scale, rtol=1e-6)


def test_features_match_open_clip(torch, tmp_path):
    """open_clip's real CLIP; the state dict saved like HPSv2's checkpoint ({"state_dict": ...})."""
    model = tiny_open_clip_model(torch)
    path = tmp_path / "tiny_open_clip.pt"
    torch.save({"state_dict": model.state_dict()}, path)
    config, params = clip_checkpoints.load_open_clip(str(path), clip.tiny(vocab_size=99))

    rng = np.random.default_rng(2)
    pixels = torch.from_numpy(rng.standard_normal((2, 3, 32, 32)).astype(np.float32))
    ids = torch.from_numpy(random_ids(rng))
    with torch.no_grad():
        out = model(pixels, ids)  # (normalised image, normalised text, logit scale)
        ref_img, ref_txt = model.encode_image(pixels), model.encode_text(ids)
    img, txt = encode(config, params, to_nhwc(pixels), ids.numpy())
    assert np.abs(img - ref_img.numpy()).max() < TOL
    assert np.abs(txt - ref_txt.numpy()).max() < TOL
    ref_scores = torch.diagonal(out[0] @ out[1][:2].T).numpy()  # HPSv2's score
    ours = paired_similarity(
        config, params, to_nhwc(pixels), jnp.asarray(ids.numpy()[:2])
    )
    assert np.abs(np.asarray(ours) - ref_scores).max() < 1e-5


def open_clip_names(torch, hf_state: dict) -> dict:
    """transformers CLIPModel weights renamed to open_clip's CLIP names (fused in_proj, [W, E]
    projections): the layout of HPSv2's checkpoint, without needing open_clip installed."""
    block_names = (
        ("attn.out_proj", "self_attn.out_proj"), ("ln_1", "layer_norm1"), ("ln_2", "layer_norm2"),
        ("mlp.c_fc", "mlp.fc1"), ("mlp.c_proj", "mlp.fc2"),
    )
    out = {}
    for src, dst in (("vision_model.", "visual.transformer."), ("text_model.", "transformer.")):
        layer = 0
        while f"{src}encoder.layers.{layer}.layer_norm1.weight" in hf_state:
            a, b = f"{src}encoder.layers.{layer}.", f"{dst}resblocks.{layer}."
            for kind in ("weight", "bias"):
                out[b + f"attn.in_proj_{kind}"] = torch.cat(
                    [hf_state[a + f"self_attn.{n}_proj.{kind}"] for n in "qkv"]
                )
                for ours, theirs in block_names:
                    out[b + f"{ours}.{kind}"] = hf_state[a + f"{theirs}.{kind}"]
            layer += 1
    v, t = "vision_model.", "text_model."
    out.update({
        "visual.conv1.weight": hf_state[v + "embeddings.patch_embedding.weight"],
        "visual.class_embedding": hf_state[v + "embeddings.class_embedding"],
        "visual.positional_embedding": hf_state[v + "embeddings.position_embedding.weight"],
        "visual.proj": hf_state["visual_projection.weight"].T.contiguous(),
        "token_embedding.weight": hf_state[t + "embeddings.token_embedding.weight"],
        "positional_embedding": hf_state[t + "embeddings.position_embedding.weight"],
        "text_projection": hf_state["text_projection.weight"].T.contiguous(),
        "logit_scale": hf_state["logit_scale"],
    })
    norms = (("visual.ln_pre", v + "pre_layrnorm"), ("visual.ln_post", v + "post_layernorm"),
             ("ln_final", t + "final_layer_norm"))
    for ours, theirs in norms:
        for kind in ("weight", "bias"):
            out[f"{ours}.{kind}"] = hf_state[f"{theirs}.{kind}"]
    return out


def test_open_clip_loader_on_renamed_transformers_weights(torch, tmp_path):
    """The open_clip loader without open_clip: transformers' tiny weights under open_clip names,
    saved as HPSv2 does; features must equal transformers' (argmax pooling: eot is the max id)."""
    model = tiny_hf_model(torch, eos_token_id=98)
    path = tmp_path / "renamed.pt"
    torch.save({"state_dict": open_clip_names(torch, model.state_dict())}, path)
    config, params = clip_checkpoints.load_open_clip(str(path), HF_TINY_AS_OPEN_CLIP)
    rng = np.random.default_rng(4)
    pixels = torch.from_numpy(rng.standard_normal((2, 3, 32, 32)).astype(np.float32))
    ids = random_ids(rng)
    with torch.no_grad():
        ref_img = model.get_image_features(pixel_values=pixels).pooler_output.numpy()
        ref_txt = model.get_text_features(input_ids=torch.from_numpy(ids)).pooler_output.numpy()
    img, txt = encode(config, params, to_nhwc(pixels), ids)
    assert np.abs(img - ref_img).max() < TOL
    assert np.abs(txt - ref_txt).max() < TOL


def test_bf16_compute_stays_close(torch, tmp_path):
    model = tiny_open_clip_model(torch, seed=3)
    path = tmp_path / "m.pt"
    torch.save(model.state_dict(), path)  # a bare state dict loads too
    cfg32, p32 = clip_checkpoints.load_open_clip(str(path), clip.tiny(vocab_size=99))
    cfg16, p16 = clip_checkpoints.load_open_clip(
        str(path), clip.tiny(vocab_size=99), dtype=jnp.bfloat16
    )
    assert p16["visual"]["proj"]["kernel"].dtype == jnp.bfloat16
    rng = np.random.default_rng(3)
    pixels = jnp.asarray(rng.standard_normal((2, 32, 32, 3)), jnp.float32)
    features = jax.jit(clip.image_features, static_argnums=0)
    f32, f16 = features(cfg32, p32, pixels), features(cfg16, p16, pixels)
    assert f16.dtype == jnp.float32
    assert np.abs(np.asarray(f32) - np.asarray(f16)).max() < 0.05


# -- loader errors -------------------------------------------------------------------------------

def test_open_clip_loader_lists_every_problem(torch, tmp_path):
    sd = open_clip_names(torch, tiny_hf_model(torch).state_dict())
    del sd["visual.ln_post.bias"]
    sd["visual.proj"] = torch.zeros(32, 15)
    sd["extra.weight"] = torch.zeros(1)
    path = tmp_path / "broken.pt"
    torch.save(sd, path)
    with pytest.raises(clip_checkpoints.CheckpointError) as e:
        clip_checkpoints.load_open_clip(str(path), HF_TINY_AS_OPEN_CLIP)
    msg = str(e.value)
    assert str(path) in msg and "3 problems" in msg
    assert "missing tensor visual.ln_post.bias" in msg
    assert "unexpected tensor extra.weight" in msg
    assert "visual/proj/kernel: expected shape (32, 16), got (32, 15)" in msg


def test_wrong_architecture_is_an_error_not_a_partial_load(torch, tmp_path):
    path = tmp_path / "tiny.pt"
    torch.save(open_clip_names(torch, tiny_hf_model(torch).state_dict()), path)
    with pytest.raises(clip_checkpoints.CheckpointError, match="problems"):
        clip_checkpoints.load_open_clip(str(path))  # default config: ViT-H-14
    with pytest.raises(FileNotFoundError, match="xswu/HPSv2"):
        clip_checkpoints.load_open_clip(str(tmp_path / "absent.pt"))
    with pytest.raises(FileNotFoundError, match="config.json"):
        clip_checkpoints.load_hf_clip(str(tmp_path))


def test_vit_h_14_shapes_match_open_clip(torch):
    """The preset's param count equals open_clip ViT-H-14's (built on the meta device)."""
    oc = open_clip_module(torch)
    with torch.device("meta"):
        ref = oc.CLIP(
            embed_dim=1024,
            vision_cfg=dict(image_size=224, layers=32, width=1280, head_width=80, patch_size=14),
            text_cfg=dict(context_length=77, vocab_size=49408, width=1024, heads=16, layers=24),
        )
    n_ref = sum(p.numel() for p in ref.parameters())
    shapes = jax.eval_shape(lambda k: clip.init_params(clip.vit_h_14(), k), jax.random.key(0))
    n_ours = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes))
    assert n_ours == n_ref
    assert clip.vit_h_14().vision_width // clip.vit_h_14().vision_heads == 80


def test_vit_l_14_config_and_shapes_match_transformers(torch):
    """openai/clip-vit-large-patch14's config values -> the vit_l_14 preset, same param count."""
    import transformers

    tower = dict(hidden_act="quick_gelu", layer_norm_eps=1e-5)
    hf = transformers.CLIPConfig(
        text_config=dict(tower, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                         num_attention_heads=12, max_position_embeddings=77, eos_token_id=2),
        vision_config=dict(tower, hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                           num_attention_heads=16, image_size=224, patch_size=14),
        projection_dim=768,
    )
    cfg = clip_checkpoints.config_from_hf(hf.to_dict())
    assert cfg == clip.vit_l_14(eos_id=None)  # eos id 2 -> argmax pooling, as transformers does
    with torch.device("meta"):
        n_ref = sum(p.numel() for p in transformers.CLIPModel(hf).parameters())
    shapes = jax.eval_shape(lambda k: clip.init_params(cfg, k), jax.random.key(0))
    assert sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes)) == n_ref == 427_616_513


# -- preprocessing -------------------------------------------------------------------------------

def _smooth_image(rng, h, w):
    from PIL import Image

    base = rng.integers(0, 256, (h // 8 + 1, w // 8 + 1, 3)).astype(np.uint8)
    img = np.asarray(Image.fromarray(base).resize((w, h), Image.BILINEAR)).astype(np.int16)
    return np.clip(img + rng.integers(-20, 21, img.shape), 0, 255).astype(np.uint8)


def _torch_reference(torch, img, size=224):
    """HPSv2's eval transform: ToTensor, Resize(bicubic, antialias), CenterCrop, Normalize."""
    h, w = img.shape[:2]
    t = torch.from_numpy(img).permute(2, 0, 1)[None].float() / 255
    nh, nw = clip_processing.resized_shape(h, w, size)
    if (nh, nw) != (h, w):
        t = torch.nn.functional.interpolate(
            t, size=(nh, nw), mode="bicubic", antialias=True, align_corners=False
        )
    top, left = int(round((nh - size) / 2)), int(round((nw - size) / 2))
    t = t[:, :, top : top + size, left : left + size]
    mean = torch.tensor(clip_processing.OPENAI_CLIP_MEAN)[:, None, None]
    std = torch.tensor(clip_processing.OPENAI_CLIP_STD)[:, None, None]
    return ((t - mean) / std)[0].permute(1, 2, 0).numpy()


@pytest.mark.parametrize("hw", [(384, 384), (48, 48), (300, 500), (224, 224)])
def test_preprocess_matches_torch_bicubic_antialias(torch, hw):
    img = _smooth_image(np.random.default_rng(sum(hw)), *hw)
    ours = np.asarray(jax.jit(clip_processing.preprocess_images)(jnp.asarray(img[None])))[0]
    assert ours.shape == (224, 224, 3)
    assert np.abs(ours - _torch_reference(torch, img)).max() < 1e-5


def test_preprocess_close_to_pil_and_accepts_float_pixels():
    from PIL import Image

    img = _smooth_image(np.random.default_rng(7), 384, 384)
    ours = np.asarray(clip_processing.preprocess_images(jnp.asarray(img[None])))[0]
    pil = np.asarray(Image.fromarray(img).resize((224, 224), Image.BICUBIC), np.float32) / 255
    pil = (pil - np.array(clip_processing.OPENAI_CLIP_MEAN)) / clip_processing.OPENAI_CLIP_STD
    err_255 = np.abs(ours - pil) * np.array(clip_processing.OPENAI_CLIP_STD) * 255
    assert err_255.mean() < 0.5 and err_255.max() < 4  # PIL rounds to uint8; same kernel
    # [-1, 1] floats (the VQ decoder's output) give the same input as their uint8 image
    as_float = jnp.asarray(img[None], jnp.float32) / 127.5 - 1.0
    from_float = np.asarray(clip_processing.preprocess_images(as_float))[0]
    assert np.abs(from_float - ours).max() < 1e-4
    with pytest.raises(ValueError, match=r"\[B, H, W, 3\]"):
        clip_processing.preprocess_images(jnp.zeros((2, 3, 32, 32), jnp.uint8))


# -- tokenisation ------------------------------------------------------------------------------

TRICKY_TEXTS = [
    "A photo of a cat.",
    "  Two  RED circles\tand a blue square!! ",
    "café naïve — ümlaut's dog's",
    "&amp; tom &lt;3 html",
    "it's 1234 o'clock, they'll've",
    "emoji 🐱🚀 and 中文字符",
    "word " * 100,
    "",
    "x<end_of_text>y <|endoftext|>",
    "mojibake: Ã©",
]


def _simple_tokenizer_cls():
    spec = importlib.util.find_spec("open_clip")
    if spec is None:
        pytest.skip("open_clip_torch not installed")
    pytest.importorskip("ftfy")
    path = f"{spec.submodule_search_locations[0]}/tokenizer.py"
    mod_spec = importlib.util.spec_from_file_location("open_clip_simple_tokenizer", path)
    module = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(module)
    return module.SimpleTokenizer


def test_tokenizer_matches_open_clip_on_its_real_vocab(torch, tmp_path):
    simple = _simple_tokenizer_cls()
    ref = simple()(TRICKY_TEXTS).numpy()
    tok = clip_processing.load_tokenizer()
    ours = clip_processing.tokenize(tok, TRICKY_TEXTS)
    assert ours.dtype == np.int32 and ours.shape == (len(TRICKY_TEXTS), 77)
    np.testing.assert_array_equal(ours, ref)
    assert ours[0, 0] == 49406 and 49407 in ours[0] and ours[6, -1] == 49407
    # saved as a transformers tokenizer directory and loaded back: the same ids
    tok.save_pretrained(tmp_path)
    reloaded = clip_processing.tokenize(clip_processing.load_tokenizer(str(tmp_path)), TRICKY_TEXTS)
    np.testing.assert_array_equal(reloaded, ref)


def test_tokenizer_from_a_locally_built_vocab(torch, tmp_path):
    """A small merges file written here (no download), read by both tokenizers."""
    merges = ["#version: 0.2", "a t</w>", "c at</w>", "t h", "th e</w>", "r e", "re d</w>"]
    merges += ["s q", "sq u", "squ a", "squa r", "squar e</w>", "o n", "on e</w>", "c a", "ca t"]
    path = tmp_path / "bpe_tiny.txt.gz"
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.write("\n".join(merges))
    texts = ["The cat", "a red square", "the cats, the CAT!", "one 2 three", "&quot;cat&quot;"]
    tok = clip_processing.load_tokenizer(str(path))
    ours = clip_processing.tokenize(tok, texts, context_length=8)
    vocab = clip_processing.vocab_from_merges(clip_processing.read_bpe_merges(str(path)))
    assert len(vocab) == 512 + len(merges) - 1 + 2
    # hand-checked: "the cat" -> the</w>, cat</w> framed by sot/eot
    sot, eot = vocab["<start_of_text>"], vocab["<end_of_text>"]
    assert ours[0].tolist() == [sot, vocab["the</w>"], vocab["cat</w>"], eot, 0, 0, 0, 0]
    assert ours[2, -1] == eot and 0 not in ours[2]  # truncated rows keep eot last
    simple = _simple_tokenizer_cls()
    ref = simple(bpe_path=str(path))(texts, context_length=8).numpy()
    np.testing.assert_array_equal(ours, ref)


def test_bad_merges_file_names_the_line(tmp_path):
    path = tmp_path / "bad.txt"
    path.write_text("#version\na b\nthree parts here\n")
    with pytest.raises(ValueError, match=r"bad.txt:3: expected a merge"):
        clip_processing.read_bpe_merges(str(path))
