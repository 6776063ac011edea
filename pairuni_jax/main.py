"""Entry point: `python -m pairuni_jax.main --config=configs/shapes.py --workdir=runs/shapes`.

The logic lives in importable modules (`pairuni_jax.train.run`), so the same job runs from Colab.
"""

from absl import app, flags, logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/shapes.py[:smoke].")
flags.DEFINE_string("workdir", None, "Where checkpoints, metrics and reports go; reruns resume.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not FLAGS["verbosity"].present:  # library INFO logs (orbax, faiss) drown the progress
        logging.set_verbosity(logging.WARNING)
    from pairuni_jax.train.run import run

    run(FLAGS.config, FLAGS.workdir)


if __name__ == "__main__":
    app.run(main)
