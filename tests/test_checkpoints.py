"""Checkpoint loading (both formats), validation errors, Hub fallback, and save_hf round trips."""

import json
import os
import shutil
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pairuni_jax import checkpoints
from pairuni_jax.checkpoints import CheckpointError, load_janus, save_hf
from pairuni_jax.models import configs, janus
from tests.janus_tiny import tiny_checkpoint, write_original_format


@pytest.fixture(scope="module")
def gqa(torch):
    return tiny_checkpoint("gqa")


def _flat(params):
    return {"/".join(k.key for k in p): np.asarray(v)
            for p, v in jax.tree_util.tree_flatten_with_path(params)[0]}


def _assert_same_params(a, b):
    fa, fb = _flat(a), _flat(b)
    assert sorted(fa) == sorted(fb)
    for name in fa:
        assert fa[name].dtype == fb[name].dtype, name
        np.testing.assert_array_equal(fa[name], fb[name], err_msg=name)


@pytest.mark.parametrize("shards", [1, 2])
def test_original_format_gives_the_same_params(gqa, tmp_path, shards):
    write_original_format(gqa.path, str(tmp_path), shards=shards)
    files = sorted(os.listdir(tmp_path))
    assert ("pytorch_model.bin" in files) == (shards == 1)
    config, params = load_janus(str(tmp_path))
    assert config == gqa.config
    _assert_same_params(params, gqa.params)


def test_original_format_needs_torch_with_a_clear_error(gqa, tmp_path, monkeypatch):
    write_original_format(gqa.path, str(tmp_path))
    monkeypatch.setitem(sys.modules, "torch", None)  # what an environment without torch sees
    with pytest.raises(ImportError, match="needs torch"):
        load_janus(str(tmp_path))


def test_bf16_storage_casts_on_the_way(gqa):
    config, params = load_janus(gqa.path, dtype="bfloat16", compute_dtype="float32")
    assert config.param_dtype == "bfloat16" and config.dtype == "float32"
    leaves = jax.tree.leaves(params)
    assert all(x.dtype == jnp.bfloat16 for x in leaves)
    ref = _flat(gqa.params)
    for name, x in _flat(params).items():
        np.testing.assert_allclose(x.astype(np.float32), ref[name], rtol=1e-2, atol=1e-2)


def test_bf16_files_round_trip(gqa, tmp_path):
    config, params = load_janus(gqa.path, dtype="bfloat16")
    save_hf(config, params, str(tmp_path))
    config2, params2 = load_janus(str(tmp_path), dtype="bfloat16")
    assert config2 == config
    _assert_same_params(params2, params)


def _broken_copy(gqa, tmp_path):
    """A copy of the tiny checkpoint with one tensor missing, one extra, one reshaped, one int."""
    from safetensors.numpy import load_file, save_file

    state = load_file(os.path.join(gqa.path, "model.safetensors"))
    del state["model.vqmodel.quant_conv.bias"]
    state["model.language_model.layers.9.mlp.up_proj.weight"] = np.zeros((2, 2), np.float32)
    state["model.aligner.fc1.weight"] = state["model.aligner.fc1.weight"].T.copy()
    state["model.generation_embeddings.weight"] = np.zeros((96, 8), np.int32)
    save_file(state, str(tmp_path / "model.safetensors"))
    shutil.copy(os.path.join(gqa.path, "config.json"), tmp_path / "config.json")


def test_broken_checkpoint_lists_every_problem_in_one_error(gqa, tmp_path):
    _broken_copy(gqa, tmp_path)
    with pytest.raises(CheckpointError) as info:
        load_janus(str(tmp_path))
    msg = str(info.value)
    assert "(4 problems)" in msg
    assert "missing     model.vqmodel.quant_conv.bias: expected shape [8]" in msg
    assert "unexpected  model.language_model.layers.9.mlp.up_proj.weight" in msg
    assert "model.aligner.fc1.weight (model.safetensors): expected [64, 32], got [32, 64]" in msg
    assert "model.generation_embeddings.weight (model.safetensors): expected a floating" in msg


def test_config_mismatch_is_reported_not_random_init(gqa, tmp_path):
    shutil.copy(os.path.join(gqa.path, "model.safetensors"), tmp_path / "model.safetensors")
    cfg = json.load(open(os.path.join(gqa.path, "config.json")))
    cfg["text_config"]["num_hidden_layers"] = 3
    json.dump(cfg, open(tmp_path / "config.json", "w"))
    with pytest.raises(CheckpointError, match=r"missing     model\.language_model\.layers\.2\."):
        load_janus(str(tmp_path))


def test_missing_directory_and_offline_hub_id_errors(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="no such checkpoint directory"):
        load_janus(str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError, match="config.json: missing"):
        load_janus(str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    with pytest.raises(FileNotFoundError) as info:
        load_janus("deepseek-community/Janus-Pro-1B")
    msg = str(info.value)
    assert "downloading it from the Hugging Face Hub failed" in msg
    assert "hf download deepseek-community/Janus-Pro-1B --local-dir DIR" in msg


def test_save_hf_round_trip_through_transformers(gqa, tmp_path, torch):
    from transformers import JanusForConditionalGeneration

    save_hf(gqa.config, gqa.params, str(tmp_path))
    config, params = load_janus(str(tmp_path))
    assert config == gqa.config
    _assert_same_params(params, gqa.params)

    model = JanusForConditionalGeneration.from_pretrained(str(tmp_path)).eval()
    ids = np.random.RandomState(0).randint(3, 200, size=(2, 6))
    with torch.no_grad():
        ref = gqa.model(input_ids=torch.tensor(ids)).logits.numpy()
        out = model(input_ids=torch.tensor(ids)).logits.numpy()
    np.testing.assert_allclose(out, ref, atol=1e-5)
    state = model.state_dict()
    for name, t in gqa.model.state_dict().items():
        np.testing.assert_array_equal(state[name].numpy(), t.numpy(), err_msg=name)


def test_save_hf_of_a_fresh_model_loads_in_transformers(gqa, tmp_path, torch):
    """Params drawn by init_params (not made by transformers) make a valid transformers model."""
    from transformers import JanusForConditionalGeneration

    config = gqa.config
    params = janus.init_params(config, jax.random.key(1))
    save_hf(config, params, str(tmp_path))
    model = JanusForConditionalGeneration.from_pretrained(str(tmp_path)).eval()
    ids = np.random.RandomState(1).randint(0, 250, size=(2, 11))  # parity tests' shape: no compile
    with torch.no_grad():
        ref = model(input_ids=torch.tensor(ids)).logits.numpy()
    h, _ = janus.forward(params, config, janus.embed_prompt(params, config, jnp.asarray(ids)),
                         jnp.ones(ids.shape, bool))
    np.testing.assert_allclose(np.asarray(janus.text_logits(params, config, h)), ref, atol=1e-4)


def test_save_hf_vq_group_counts(gqa, tmp_path, torch):
    """transformers' VQ hard-codes GroupNorm(32). A small VQ with fewer groups (the Shapes
    world's) saves with its count, which our loader reads back and transformers refuses outright;
    a VQ that transformers would load with 32 groups and silently different numbers is refused."""
    import dataclasses

    from transformers import JanusForConditionalGeneration

    vq = dataclasses.replace(gqa.config.vq, ch=16, ch_mult=(1, 2), num_groups=8)
    config = gqa.config.replace(vq=vq)
    params = janus.init_params(config, jax.random.key(2))
    save_hf(config, params, str(tmp_path / "small"))
    loaded, back = load_janus(str(tmp_path / "small"))
    assert loaded == config
    _assert_same_params(back, params)
    with pytest.raises(ValueError, match="divisible"):
        JanusForConditionalGeneration.from_pretrained(str(tmp_path / "small"))

    wide = gqa.config.replace(vq=dataclasses.replace(vq, ch=32))
    with pytest.raises(ValueError, match="GroupNorm"):
        save_hf(wide, janus.init_params(wide, jax.random.key(2)), str(tmp_path / "wide"))


def test_name_mapping_round_trips_for_the_real_geometry():
    """Every param of the 1B geometry (2 LM / vision layers for speed) maps to a distinct
    transformers name, and original names of the fused/renamed tensors map back to them."""
    real = configs.janus_pro_1b()
    real = real.replace(text=configs.LlamaConfig(num_layers=2),
                        vision=configs.SigLIPConfig(depth=2))
    shapes = janus.param_shapes(real)
    names = [checkpoints.hf_name(tuple(k.key for k in p))
             for p, _ in jax.tree_util.tree_flatten_with_path(shapes)[0]]
    assert len(set(names)) == len(names)
    assert "model.vqmodel.decoder.up.0.attn.2.proj_out.weight" in names
    assert "model.vqmodel.encoder.mid.attn_1.q.weight" in names
    assert "model.vision_model.encoder.layers.1.self_attn.projection_layer.bias" in names
    o2h = checkpoints.original_to_hf
    assert o2h("gen_vision_model.decoder.conv_blocks.0.attn.2.proj_out.weight") in names
    assert o2h("gen_vision_model.encoder.mid.1.q.weight") in names
    assert o2h("gen_vision_model.encoder.conv_blocks.3.res.1.nin_shortcut.weight") is not None
    assert o2h("vision_model.vision_tower.blocks.1.attn.proj.bias") in names
    assert o2h("gen_aligner.layers.2.weight") == "model.generation_aligner.hidden_layers.0.weight"
    assert o2h("language_model.lm_head.weight") == "lm_head.weight"
    assert o2h("vision_model.vision_tower.attn_pool.q.weight") is None
    assert o2h("gen_vision_model.quantize.codebook_used") is None


ORIGINAL_1B_CONFIG = {  # the shape of deepseek-ai/Janus-Pro-1B's config.json
    "aligner_config": {"cls": "MlpProjector", "model_type": "aligner", "params": {
        "depth": 2, "input_dim": 1024, "n_embed": 2048, "projector_type": "mlp_gelu"}},
    "gen_aligner_config": {"cls": "MlpProjector", "model_type": "gen_aligner", "params": {
        "depth": 2, "input_dim": 8, "n_embed": 2048, "projector_type": "mlp_gelu"}},
    "gen_head_config": {"cls": "vision_head", "model_type": "gen_head", "params": {
        "image_token_embed": 2048, "image_token_size": 16384, "n_embed": 2048}},
    "gen_vision_config": {"cls": "VQ-16", "model_type": "gen_vision", "params": {
        "image_token_size": 16384, "n_embed": 8}},
    "language_config": {"hidden_size": 2048, "intermediate_size": 5632,
                        "max_position_embeddings": 16384, "model_type": "llama",
                        "num_attention_heads": 16, "num_hidden_layers": 24,
                        "num_key_value_heads": 16, "torch_dtype": "bfloat16",
                        "vocab_size": 102400},
    "model_type": "multi_modality",
    "vision_config": {"cls": "CLIPVisionTower", "model_type": "vision", "params": {
        "image_size": 384, "model_name": "siglip_large_patch16_384", "select_feature": "same",
        "select_layer": -1}},
}


def test_config_readers_give_the_released_geometries(torch):
    from transformers import JanusConfig, LlamaConfig

    assert configs.from_hf_config(ORIGINAL_1B_CONFIG) == configs.janus_pro_1b()
    seven = json.loads(json.dumps(ORIGINAL_1B_CONFIG))
    seven["language_config"].update(hidden_size=4096, intermediate_size=11008,
                                    num_attention_heads=32, num_hidden_layers=30,
                                    num_key_value_heads=32)
    for key in ("aligner_config", "gen_aligner_config"):
        seven[key]["params"]["n_embed"] = 4096
    seven["gen_head_config"]["params"].update(image_token_embed=4096, n_embed=4096)
    assert configs.from_hf_config(seven) == configs.janus_pro_7b()

    text = LlamaConfig(vocab_size=102400, hidden_size=2048, intermediate_size=5632,
                       num_hidden_layers=24, num_attention_heads=16, num_key_value_heads=16,
                       max_position_embeddings=16384)
    hf = JanusConfig(text_config=text).to_dict()  # transformers' defaults are the 1B towers
    assert configs.from_hf_config(hf) == configs.janus_pro_1b()
    assert configs.from_hf_config(hf, dtype="bfloat16").compute_dtype == jnp.bfloat16
    with pytest.raises(ValueError, match="neither 'text_config'"):
        configs.from_hf_config({"model_type": "llama"})
    bad = json.loads(json.dumps(ORIGINAL_1B_CONFIG))
    bad["vision_config"]["params"]["model_name"] = "siglip_so400m"
    with pytest.raises(ValueError, match="model_name 'siglip_so400m' is unknown"):
        configs.from_hf_config(bad)
