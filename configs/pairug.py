"""The PairUni recipe: Pair-GRPO on PairUG pairs with real Janus-Pro weights (1B or 7B).

    python -m pairuni_jax.main --config=configs/pairug.py:1b --workdir=runs/pairug_1b \
        --config.data.path=data/pairug/pairs.jsonl \
        --config.reward.hpsv2_checkpoint=weights/HPS_v2.1_compressed.pt

Presets: `configs/pairug.py` or `:1b` (Janus-Pro-1B, group size 8), `:7b` (Janus-Pro-7B, group
size 4). Settings from the paper (REFERENCE.md §2): CFG 5, temperature 1.0, lr 1e-6, global batch
16 pairs, beta 0 (no reference model), HPSv2 as the generation reward, multiple-choice accuracy as
the understanding reward, sqrt(similarity) pair weights. Everything the paper leaves open (clip
range, optimizer, full fine-tuning vs LoRA, answer length) is marked "not stated" below.
Every field can be overridden on the command line, e.g.
`--config.lora.rank=16 --config.rl.combiner.mode=pareto --config.mesh.fsdp=4`.
No weights or data at hand? `configs/shapes.py` runs the whole pipeline with nothing to download.
"""

import ml_collections

from pairuni_jax.models.lora import JANUS_LLM_TARGETS

PRESETS = {
    # hub id, group size G, steps
    "1b": ("deepseek-ai/Janus-Pro-1B", 8, 1200),  # steps not stated for 1B: the 7B bound
    "7b": ("deepseek-ai/Janus-Pro-7B", 4, 1200),  # "at most 1200 steps"
}


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    preset = arg or "1b"
    if preset not in PRESETS:
        raise ValueError(f"configs/pairug.py: unknown preset {arg!r}; use '1b' or '7b'")
    hub_id, group_size, steps = PRESETS[preset]
    c = ml_collections.ConfigDict()
    c.job = "pairug"
    c.preset = preset
    c.seed = 0
    # Compiled programs are kept here and reused by later runs ("" for none).
    c.compile_cache = "~/.cache/pairuni_jax/xla"

    # Weights: a local checkpoint directory (either format) or a Hugging Face Hub id.
    # Full fine-tuning keeps float32 master weights (an lr 1e-6 step is below bfloat16's
    # resolution) and computes in bfloat16; with LoRA the frozen base may be bfloat16 too.
    c.model = dict(path=hub_id, dtype="float32", compute_dtype="bfloat16")

    # PairUG pairs: a JSONL file (`pairug validate` checks it) or a directory written by the TFDS
    # builder (data/tfds_pairug.py). image_root: where image paths resolve ('' = the file's dir).
    # fast_resize: large JPEGs decode at 1/2-1/8 scale before the bicubic resize (~1.8x the
    # pairs/s per core, mean |pixel diff| ~0.003 on [-1, 1]); False: bit-identical to the
    # reference's preprocessing.
    c.data = dict(path="", image_root="", on_error="raise", bucket_multiple=64,
                  fast_resize=True)

    # Generation reward (rl/rewards.py registry): "hpsv2", "clip", "shapes", or weighted,
    # e.g. "hpsv2=1,clip=0.5". Understanding: multiple-choice accuracy (+ rl.format_weight).
    c.reward = dict(
        generation="hpsv2",
        hpsv2_checkpoint="weights/HPS_v2.1_compressed.pt",
        hpsv2_tokenizer="",  # '' = the bpe file inside an installed open_clip_torch
        hpsv2_arch="vit_h_14",
        clip_path="",
        clip_tokenizer="",  # '' = clip_path
        shapes_strict=False,
        dtype="float32",
    )

    # LoRA over the LLM projections; rank 0 = full fine-tuning (vision encoder and VQ frozen).
    c.lora = dict(rank=0, alpha=32.0, dropout=0.0, targets=JANUS_LLM_TARGETS)

    # Device mesh ('data', 'fsdp', 'tensor'); one size may be -1 (all remaining devices).
    c.mesh = dict(data=1, fsdp=-1, tensor=1)

    # Pair-GRPO (train/rl.py, train/rl_step.py).
    c.rl = dict(
        steps=steps,
        pairs_per_batch=16,  # global: P pairs per step over all hosts (8 GPUs x 2 in the paper)
        group_size=group_size,  # G: answers per question and images per prompt
        temperature=1.0,
        guidance=5.0,  # CFG weight for image rollouts
        max_new_tokens=512,  # answer length (<think>...</think><answer>X</answer>); not stated
        mu=1,  # updates per rollout batch; not stated
        learning_rate=1e-6,
        warmup_steps=0,
        weight_decay=0.0,  # AdamW as the open Janus-Pro GRPO trainer; not stated
        max_grad_norm=1.0,
        eps_low=0.2,  # clip range; not stated
        eps_high=0.2,
        beta=0.0,  # no KL term, so no reference model
        adv_eps=1e-4,  # A = (r - mean) / (std + adv_eps) per group, as T2I-R1
        std_ddof=1,  # unbiased group std (torch's default, T2I-R1); 0: population std
        pair_weighting="sqrt",  # retrieved pairs: sqrt(s_p) | linear | none; aligned: 1
        aggregation="task_sum",  # L_und + L_gen; token_mean | seq_mean also available
        combiner=dict(mode="sum", normalization="none", groups=()),  # or mode=pareto
        format_weight=0.0,  # reward share of the <think>/<answer> format; 0 = accuracy only
        num_micro_batches=1,  # raise to fit memory (7B); the update is the same
        log_every=1,
        checkpoint_every=100,
        keep=3,
        eval_every=100,  # with eval.understanding set; 0 = only at the start and the end
    )

    # Held-out understanding questions (an understanding JSONL, like `pairug validate` reads):
    # greedy answers, multiple-choice accuracy overall and by tag. '' = no evaluation.
    c.eval = dict(understanding="", image_root="", max_items=0, batch_size=16)
    return c
