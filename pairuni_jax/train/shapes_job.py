"""The embedded default: the whole PairUni pipeline on the Shapes world, on a laptop CPU.

Stages (each resumable, results under <workdir>/<stage>/):
  world   render the world: train, held-out (compositional) and test (in-distribution)
          understanding/generation sets, aligned pairs, the word-level tokenizer
  vq      fit the tiny VQ (Janus's VQ-16 architecture) on the world's images
  vision  (only with `vision.steps` > 0) pretrain the policy's vision encoder to name the colour
          and shape under each patch of the training images (`vision_pretrain`)
  sft     a tiny Janus-architecture policy, warm-started on both tasks (sum or Pareto combiner);
          saved in transformers' format with the tokenizer, like a real checkpoint
  pairs   retrieved pairs by the pairing command's code over image features, plus aligned pairs
  rl      Pair-GRPO from the SFT policy on the pairs, with the Shapes checker as image reward
Evaluations of the SFT and RL stages (and ablation runs) are kept in <workdir>/eval_cache/, by a
digest of the params and the evaluator's settings.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from typing import Any

import flax.serialization
import jax
import ml_collections
import numpy as np
from PIL import Image

from pairuni_jax import checkpoints, files
from pairuni_jax.data import features as features_lib
from pairuni_jax.data import pairing, pairug
from pairuni_jax.data import pipeline as pipeline_lib
from pairuni_jax.data.shapes import write_world
from pairuni_jax.data.shapes_render import ShapeObject, WorldConfig
from pairuni_jax.models import janus
from pairuni_jax.models.configs import JanusConfig, LlamaConfig, SigLIPConfig, VQConfig
from pairuni_jax.processing import JanusProcessor, preprocess_image
from pairuni_jax.rl.rewards import build_generation_reward
from pairuni_jax.train import rl as rl_lib
from pairuni_jax.train import sft as sft_lib
from pairuni_jax.train import vision_pretrain
from pairuni_jax.train import vq as vq_lib
from pairuni_jax.train.evaluate import ShapesEvaluator
from pairuni_jax.train.metrics import read_jsonl
from pairuni_jax.train.report import write_report
from pairuni_jax.train.stages import Stage, run_stages

VISION_PARAMS = "vision_model.msgpack"  # the pretrained encoder, in the vision stage's directory


def world_config(config: ml_collections.ConfigDict) -> WorldConfig:
    w = config.world
    return WorldConfig(image_size=w.image_size,
                       shuffle_options=w.get("shuffle_options", WorldConfig.shuffle_options))


def vq_train_config(config: ml_collections.ConfigDict) -> vq_lib.VQTrainConfig:
    """The VQ fit's settings from the `vq` section (fields it leaves out keep their defaults)."""
    v = config.vq
    fields = ("steps", "batch_size", "learning_rate", "warmup_steps", "num_images",
              "autoencoder_fraction", "kmeans_images", "restart_after", "crop_size")
    return vq_lib.VQTrainConfig(seed=config.seed, **{k: v[k] for k in fields if k in v})


def vq_model_config(config: ml_collections.ConfigDict) -> VQConfig:
    """The world's VQ architecture at the world's image size and `vq.codebook_size`."""
    return vq_lib.shapes_vq_config(world_config(config).image_size,
                                   config.vq.get("codebook_size", vq_lib.SHAPES_CODEBOOK_SIZE))


def policy_config(config: ml_collections.ConfigDict, vocab_size: int) -> JanusConfig:
    """The tiny Janus-architecture policy: its VQ is the world's, its vision grid matches it."""
    p, world = config.policy, world_config(config)
    vq = vq_model_config(config)
    text = LlamaConfig(
        vocab_size=vocab_size, hidden_size=p.hidden_size, intermediate_size=p.intermediate_size,
        num_layers=p.num_layers, num_heads=p.num_heads, num_kv_heads=p.num_kv_heads,
        head_dim=p.hidden_size // p.num_heads, max_position_embeddings=1024,
    )
    vision = SigLIPConfig(
        image_size=world.image_size, patch_size=world.image_size // vq.grid,
        width=p.vision_width, depth=p.vision_depth, num_heads=p.vision_heads,
        mlp_dim=4 * p.vision_width,
    )
    return JanusConfig(text=text, vision=vision, vq=vq, gen_head_dim=p.hidden_size,
                       dtype=p.dtype, param_dtype=p.dtype)


def _load_image(root: str, rel: str) -> np.ndarray:
    with Image.open(os.path.join(root, rel)) as im:
        return np.asarray(im.convert("RGB"))


def save_policy(model_config: JanusConfig, params, tokenizer_dir: str, path: str) -> str:
    """A checkpoint directory like a real one: transformers-format weights + the tokenizer."""
    checkpoints.save_hf(model_config, jax.device_get(params), path)
    for name in os.listdir(tokenizer_dir):
        shutil.copy(os.path.join(tokenizer_dir, name), path)
    return path


class ShapesJob:
    """The stages of the embedded default, sharing the config and the workdir."""

    def __init__(self, config: ml_collections.ConfigDict, workdir: str, log=print):
        if files.is_url(workdir):
            raise ValueError(f"--workdir={workdir}: the Shapes job renders its world and keeps "
                             "its stages in local files; give it a local directory")
        self.config, self.workdir, self.log = config, os.path.abspath(workdir), log
        self.world_dir = os.path.join(self.workdir, "world")
        side = world_config(config).image_size  # a bad crop is refused before any stage runs
        vq_lib.check_crop_size(vq_train_config(config).crop_size, side,
                               vq_model_config(config).downsample, "vq.crop_size")

    def stages(self) -> list[Stage]:
        """The stages in order, each with the config sections its result depends on."""
        c = self.config.to_dict()
        sampling = {k: c["rl"][k] for k in ("guidance", "temperature")}  # used by the evaluator
        world = {"seed": c["seed"], "world": c["world"]}
        # The VQ sees only rendered scenes: the dataset's sizes and question format do not matter.
        vq = {"seed": c["seed"], "world": {"image_size": c["world"]["image_size"]}, "vq": c["vq"]}
        sft = dict(world, vq=c["vq"], policy=c["policy"], sft=c["sft"], eval=c["eval"],
                   eval_sampling=sampling)
        vision = []
        if self.pretrains_vision:  # a config without the stage keeps its SFT inputs as they were
            vision = [Stage("vision", self.vision, dict(world, policy=c["policy"],
                                                        vision=c["vision"]))]
            sft["vision"] = c["vision"]
        pairs = dict(world, pairing=c["pairing"])
        rl = dict(sft, pairing=c["pairing"], rl=c["rl"], reward=c["reward"])
        return [Stage("world", self.world, world), Stage("vq", self.vq, vq), *vision,
                Stage("sft", self.sft, sft), Stage("pairs", self.pairs, pairs),
                Stage("rl", self.rl, rl)]

    @property
    def pretrains_vision(self) -> bool:
        return self.config.get("vision", {}).get("steps", 0) > 0

    def run(self) -> dict[str, dict[str, Any]]:
        """Run (or resume) every stage, then write the report (on a rerun too)."""
        stages = self.stages()
        results = run_stages(self.workdir, stages, self.log)
        self.log(f"report: {write_report(self.workdir, [s.name for s in stages])}")
        return results

    # -- stages -------------------------------------------------------------------------------

    def world(self, stage_dir: str) -> dict[str, Any]:
        w = self.config.world
        files = write_world(stage_dir, train_size=w.train_size, train_pairs=w.train_pairs,
                            heldout_size=w.heldout_size, heldout_pairs=w.heldout_pairs,
                            test_size=w.test_size,
                            cfg=world_config(self.config), seed=self.config.seed)
        return {"files": {k: os.path.relpath(v, stage_dir) for k, v in files.items()}}

    def _fit_vq(self, stage_dir: str):
        return vq_lib.fit_vq(stage_dir, world=world_config(self.config),
                             vq=vq_model_config(self.config),
                             train=vq_train_config(self.config), log=self.log)

    def vq(self, stage_dir: str) -> dict[str, Any]:
        model, params = self._fit_vq(stage_dir)
        acc = vq_lib.checker_accuracy(model, params, world_config(self.config),
                                      per_category=self.config.vq.eval_per_category,
                                      split="heldout")
        self.log("vq: checker accuracy on held-out reconstructions: "
                 + ", ".join(f"{k} {v:.3f}" for k, v in acc.items()))
        return {"checker_accuracy_on_reconstructions": acc}

    def vision(self, stage_dir: str) -> dict[str, Any]:
        proc = self.processor()
        model_config = policy_config(self.config, len(proc.tokenizer))
        v, root = model_config.vision, self.world_dir
        scenes = read_jsonl(os.path.join(root, "train_scenes.jsonl"))
        pixels = np.stack([preprocess_image(_load_image(root, r["image_path"]), v.image_size)
                           for r in scenes])  # [B, S, S, 3] in [-1, 1]
        targets = [vision_pretrain.patch_targets(tuple(ShapeObject(**o) for o in r["objects"]),
                                                 v.image_size, v.patch_size) for r in scenes]
        colour = np.stack([t[0] for t in targets])  # [B, N, 7]
        shape = np.stack([t[1] for t in targets])  # [B, N, 4]
        params = janus.init_params(model_config, jax.random.key(self.config.seed))
        c = self.config.vision
        cfg = vision_pretrain.VisionPretrainConfig(
            steps=c.steps, batch_size=c.batch_size, learning_rate=c.learning_rate,
            warmup_steps=c.warmup_steps, seed=self.config.seed)
        self.log(f"vision: pretraining the encoder on {len(scenes)} training images")
        vision_params, losses = vision_pretrain.pretrain_vision(
            params["vision_model"], v, pixels, colour, shape, cfg, log=self.log)
        path = os.path.join(stage_dir, VISION_PARAMS)
        with open(path, "wb") as f:
            f.write(flax.serialization.msgpack_serialize(jax.device_get(vision_params)))
        return {"params": os.path.relpath(path, self.workdir), "losses": losses}

    def processor(self, model_dir: str | None = None) -> JanusProcessor:
        world = world_config(self.config)
        grid = vq_model_config(self.config).grid
        proc = JanusProcessor.from_pretrained(
            model_dir or os.path.join(self.world_dir, "tokenizer"),
            image_size=world.image_size, num_image_tokens=grid * grid)
        return dataclasses.replace(proc, system_prompt="")

    def sft_data(self, proc: JanusProcessor, vq_model, vq_params) -> sft_lib.SFTData:
        root = self.world_dir
        und = read_jsonl(os.path.join(root, "train_understanding.jsonl"))
        gen = read_jsonl(os.path.join(root, "train_generation.jsonl"))
        for pair in read_jsonl(os.path.join(root, "train_aligned_pairs.jsonl")):
            und.append(pair["understand_ann"])
            gen.append(pair["generate_ann"])
        und_items = [(_load_image(root, r["image_path"]), r["question"], r["answer"])
                     for r in und]
        gen_images = np.stack([_load_image(root, r["image_path"]) for r in gen])
        encode = jax.jit(lambda x: vq_model.apply(vq_params, vq_lib.to_model_pixels(x),
                                                   method=type(vq_model).encode))
        codes = np.concatenate([np.asarray(encode(gen_images[i:i + 256]))
                                for i in range(0, len(gen_images), 256)])
        return sft_lib.build_sft_data(proc, und_items,
                                      [(r["prompt"], c) for r, c in zip(gen, codes, strict=True)])

    def sft(self, stage_dir: str) -> dict[str, Any]:
        vq_model, vq_params = self._fit_vq(os.path.join(self.workdir, "vq"))
        proc = self.processor()
        model_config = policy_config(self.config, len(proc.tokenizer))
        params = janus.init_params(model_config, jax.random.key(self.config.seed))
        params = dict(params, vqmodel=vq_params["params"])
        if self.pretrains_vision:
            with open(os.path.join(self.workdir, "vision", VISION_PARAMS), "rb") as f:
                params["vision_model"] = flax.serialization.msgpack_restore(f.read())
        data = self.sft_data(proc, vq_model, vq_params)
        s = self.config.sft
        cfg = sft_lib.SFTConfig(
            steps=s.steps, batch_size=s.batch_size, learning_rate=s.learning_rate,
            warmup_steps=s.warmup_steps, cfg_dropout=s.get("cfg_dropout", 0.0),
            combiner=rl_lib.combiner_from(s.combiner), seed=self.config.seed,
            log_every=s.log_every, checkpoint_every=s.checkpoint_every)
        self.log(f"sft: {len(data.und_ids)} understanding and {len(data.gen_ids)} generation "
                 f"examples; policy {param_count(params) / 1e6:.2f}M params")
        params, metrics = sft_lib.train_sft(
            params, model_config, data, cfg, stage_dir,
            evaluate=self.evaluator(proc, model_config), log=self.log)
        model_dir = save_policy(model_config, params, os.path.join(self.world_dir, "tokenizer"),
                                os.path.join(stage_dir, "model"))
        return {"model": os.path.relpath(model_dir, self.workdir), "metrics": metrics}

    def pairs(self, stage_dir: str) -> dict[str, Any]:
        p, root = self.config.pairing, self.world_dir
        und = pairug.read_understanding_set(os.path.join(root, "train_understanding.jsonl"))
        gen = pairug.read_generation_set(os.path.join(root, "train_generation.jsonl"))
        aligned = [pairug.read_pairug(os.path.join(root, "train_aligned_pairs.jsonl"))]
        extractor = features_lib.make_extractor(p.features)
        cache = os.path.join(stage_dir, ".features")

        def feats(rr):
            paths = [os.path.join(rr.root, x.image_path) for x in rr.records]
            return features_lib.compute_features(paths, extractor, cache_dir=cache)

        config = pairing.PairingConfig(top_n=p.top_n, threshold=p.threshold,
                                       clusters=p.clusters, seed=self.config.seed)
        result = pairing.build_pairs(und, gen, feats(und), feats(gen), out_root=root,
                                     config=config, aligned=aligned)
        out = os.path.join(root, "train_pairs.jsonl")
        pairug.write_pairug(out, result.records)
        with open(os.path.join(stage_dir, "report.json"), "w") as f:
            json.dump(result.report, f, indent=1)
        pairing.plot_histogram(result.report, os.path.join(stage_dir, "similarity.png"))
        self.log(f"pairs: {len(result.records)} pairs {result.report['by_pair_type']}")
        return {"pairs": os.path.relpath(out, self.workdir),
                "by_pair_type": result.report["by_pair_type"]}


    def evaluator(self, proc: JanusProcessor, model_config: JanusConfig) -> ShapesEvaluator:
        e, r = self.config.eval, self.config.rl
        return ShapesEvaluator(self.world_dir, proc, model_config,
                               num_understanding=e.num_understanding,
                               num_generation=e.num_generation, und_samples=e.und_samples,
                               guidance=r.guidance, temperature=r.temperature,
                               seed=self.config.seed,
                               world_config=world_config(self.config),
                               cache_dir=os.path.join(self.workdir, "eval_cache"))

    def rl(self, stage_dir: str) -> dict[str, Any]:
        pairs = os.path.join(self.world_dir, "train_pairs.jsonl")
        return self.train_policy(stage_dir, rl_config(self.config), pairs)

    def train_policy(self, stage_dir: str, cfg: rl_lib.RLConfig, pairs_path: str, *,
                     save_model: bool = True) -> dict[str, Any]:
        """Pair-GRPO from the SFT policy on the PairUG file `pairs_path` (the `rl` stage, and
        every ablation run: same start, same evaluator, only the data and `cfg` differ)."""
        sft_model = os.path.join(self.workdir, "sft", "model")
        model_config, params = checkpoints.load_janus(sft_model)
        proc = self.processor(sft_model)
        source = pipeline_lib.JsonlPairSource(pairs_path)
        pipeline = pipeline_lib.PairPipeline(source, proc, pipeline_lib.PipelineConfig(
            pairs_per_batch=self.config.rl.pairs_per_batch, seed=cfg.seed,
            bucket_multiple=32))
        reward = build_generation_reward(self.config.reward.to_dict())
        params, summary = rl_lib.train_rl(params, model_config, proc, pipeline, reward, cfg,
                                          stage_dir, evaluate=self.evaluator(proc, model_config),
                                          log=self.log)
        result: dict[str, Any] = {"metrics": summary}
        if save_model:
            model_dir = save_policy(model_config, params,
                                    os.path.join(self.world_dir, "tokenizer"),
                                    os.path.join(stage_dir, "model"))
            result["model"] = os.path.relpath(model_dir, self.workdir)
        return result


def param_count(params) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))


def rl_config(config: ml_collections.ConfigDict, seed: int | None = None) -> rl_lib.RLConfig:
    """The Shapes job's RLConfig: leaves matching a `rl.frozen` regex stay fixed (the VQ always)."""
    frozen = tuple(dict.fromkeys((r"^vqmodel/", *config.rl.get("frozen", ()))))
    return rl_lib.rl_config_from(config.rl, config.seed if seed is None else seed, frozen=frozen)
