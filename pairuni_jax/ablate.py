"""Ablations on the Shapes world (PairUni Tables 5-6): variants trained from one SFT start.

    python -m pairuni_jax.ablate --config=configs/shapes.py:smoke --workdir=runs/ablate \
        [--variants=pair_sqrt,random_pairs] [--seeds=0,1,2]

Variants: und_only, gen_only, unpaired, random_pairs, pair_none, pair_linear, pair_sqrt,
pair_pareto (default: all). The logic is in `pairuni_jax.train.ablate` (importable from Colab).
"""

from absl import app, flags, logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/shapes.py[:smoke].")
flags.DEFINE_string("workdir", None, "The Shapes job's workdir (reused); runs go in ablations/.")
flags.DEFINE_list("variants", None, "Variants to run (default: all).")
flags.DEFINE_list("seeds", None, "RL seeds; each run then goes in ablations/<variant>/seed<k>.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
    from pairuni_jax.train.ablate import run_ablation

    try:
        seeds = [int(s) for s in FLAGS.seeds] if FLAGS.seeds else None
    except ValueError as e:
        raise app.UsageError(f"--seeds: expected integers, got {FLAGS.seeds}") from e
    paths = run_ablation(FLAGS.config, FLAGS.workdir, FLAGS.variants, seeds)
    print("\n".join(f"{k}: {v}" for k, v in paths.items()))


if __name__ == "__main__":
    app.run(main)
