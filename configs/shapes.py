"""The embedded default: the whole PairUni pipeline on the synthetic Shapes world, on a CPU.

    python -m pairuni_jax.main --config=configs/shapes.py --workdir=runs/shapes

Presets: `configs/shapes.py` (default; measured on idle 2-core CPU VMs: 12.5-14 min in all on the
slower hosts, of which VQ fit 3.2-4.3, SFT 4.4-5.2, Pair-GRPO 4.1-4.6; 4.1-5.8 min on faster hosts
with the compile cache warm: VQ 1.3-1.9, SFT 1.6-2.4, Pair-GRPO 1.2-1.5),
`configs/shapes.py:smoke` (2.4 min with nothing compiled yet and another job on the cores, mostly
compilation; about 1 min when the programs are in `compile_cache` from an earlier run).
Every field can be overridden on the command line, e.g.
`--config.sft.combiner.mode=pareto --config.seed=1`.
"""

import ml_collections


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    preset = arg or "default"
    if preset not in ("default", "smoke"):
        raise ValueError(f"configs/shapes.py: unknown preset {arg!r}; use '' or 'smoke'")
    smoke = preset == "smoke"
    c = ml_collections.ConfigDict()
    c.job = "shapes"
    c.seed = 0
    # Compiled programs are kept here and reused by later runs ("" for none).
    c.compile_cache = "~/.cache/pairuni_jax/xla"

    # The world (pairuni_jax/data/shapes*.py). 32 px images -> an 8 x 8 grid of image tokens.
    c.world = dict(
        image_size=32,
        train_size=200 if smoke else 1200,  # understanding items, and generation items, per split
        train_pairs=100 if smoke else 600,  # aligned pairs
        # an accuracy near 0.35 has a binomial std of 0.014 on 1200 questions, 0.028 on 300
        heldout_size=60 if smoke else 1200,
        heldout_pairs=30 if smoke else 150,
        test_size=60 if smoke else 300,  # in-distribution test items (new scenes) per task
        shuffle_options=False,  # True: <= 4 multiple-choice options in random order
    )
    # The tiny VQ (Janus's VQ-16 architecture, 3 levels), fitted on the world's images.
    c.vq = dict(
        codebook_size=1024,  # image tokens (Janus: 16384); 256 vs 1024: README, `vq.codebook_size`
        steps=120 if smoke else 2000,
        batch_size=16,
        learning_rate=5e-3,
        warmup_steps=10 if smoke else 50,
        num_images=512 if smoke else 4096,
        autoencoder_fraction=0.25,  # leading share of steps with the quantizer bypassed
        kmeans_images=256,  # images whose latents initialise the codebook by k-means
        restart_after=50,  # steps unused before a code is re-seeded from the batch
        crop_size=24,  # trains on random 24 px crops (0: whole images): 0.5x the work per step
        eval_per_category=10 if smoke else 50,
    )
    # The policy: Janus-Pro's architecture at a size a CPU trains in minutes.
    c.policy = dict(
        hidden_size=64 if smoke else 128,
        intermediate_size=128 if smoke else 256,
        num_layers=2 if smoke else 3,
        num_heads=4,
        num_kv_heads=2,
        vision_width=32 if smoke else 64,
        vision_depth=1 if smoke else 2,
        vision_heads=2,
        dtype="float32",
    )
    # Pretraining of the policy's vision encoder on the training images (pairuni_jax/train/
    # vision_pretrain.py): each patch's colour and shape. 0 steps: no such stage (README).
    c.vision = dict(steps=0, batch_size=64, learning_rate=1e-3, warmup_steps=20)
    # Supervised warm start on both tasks; combiner 'sum' or 'pareto' (the Pareto LoRA setting).
    c.sft = dict(
        steps=60 if smoke else 300,
        batch_size=16,
        learning_rate=1e-3,
        warmup_steps=10 if smoke else 30,
        cfg_dropout=0.0,  # share of generation examples trained unconditionally (README)
        combiner=dict(mode="sum", normalization="none", groups=()),
        log_every=20 if smoke else 50,
        checkpoint_every=500,
    )
    # Retrieved pairs (pairuni_jax/data/pairing.py) over image features.
    c.pairing = dict(features="pixels", threshold=0.6, top_n=10, clusters=0)
    # Pair-GRPO (pairuni_jax/train/rl.py, rl_step.py): the paper's recipe at the world's scale.
    c.rl = dict(
        steps=64 if smoke else 100,  # smoke: two passes over its 256 pairs
        pairs_per_batch=8,  # P
        group_size=4 if smoke else 8,  # G: answers per question and images per prompt
        temperature=1.0,
        guidance=5.0,
        max_new_tokens=4,
        mu=1,
        learning_rate=3e-4 if smoke else 1e-4,  # smoke: its short run still moves the policy
        warmup_steps=0,
        max_grad_norm=1.0,
        eps_low=0.2,
        eps_high=0.2,
        beta=0.0,
        adv_eps=1e-4,  # A = (r - mean) / (std + adv_eps) per group, as T2I-R1
        std_ddof=1,  # unbiased group std (torch's default, T2I-R1); 0: population std
        pair_weighting="sqrt",  # retrieved pairs: sqrt(s_p) | linear | none; aligned: 1
        aggregation="task_sum",  # token_mean | seq_mean | task_sum
        combiner=dict(mode="sum", normalization="none", groups=()),
        frozen=(),  # param path regexes RL keeps fixed (the VQ always), e.g. ("^vision_model/",)
        num_micro_batches=1,
        log_every=1,
        checkpoint_every=25,
        eval_every=0 if smoke else 50,
    )
    c.reward = dict(generation="shapes")  # hpsv2 | clip | shapes, or weighted: "shapes=1,clip=0.5"
    # Evaluation on the held-out (compositional) and test (in-distribution) splits, each.
    c.eval = dict(
        num_understanding=40 if smoke else 1200,  # per split, at most its size (test: 300)
        num_generation=24 if smoke else 300,
        und_samples=4,  # answers sampled per question at rl.temperature for und/acc_sampled
    )
    return c
