"""Entry point: `python -m pairuni_jax.main --config=configs/shapes.py --workdir=runs/shapes`.

The logic lives in importable modules (`pairuni_jax.train.run`), so the same job runs from Colab.
On a TPU VM pod slice, SLURM or Open MPI the same command joins the multi-process job by itself
(train/distributed.py); on other clusters pass --coordinator_address, --num_processes and
--process_id (or JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID).
"""

from absl import app, flags, logging
from ml_collections import config_flags

from pairuni_jax.train import distributed

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/shapes.py[:smoke].")
flags.DEFINE_string("workdir", None, "Where checkpoints, metrics and reports go; reruns resume.")
flags.DEFINE_enum("distributed", "auto", distributed.MODES,
                  "Multi-process start: auto (detect), on (always), off (single process).")
flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-process GPU/CPU).")
flags.DEFINE_integer("num_processes", None, "Number of processes in the job.")
flags.DEFINE_integer("process_id", None, "This process's index in [0, num_processes).")
flags.DEFINE_string("local_device_ids", None, "Devices this process uses, e.g. '0,1' (GPU).")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not FLAGS["verbosity"].present:  # library INFO logs (orbax, faiss) drown the progress
        logging.set_verbosity(logging.WARNING)
    distributed.initialize(FLAGS.distributed, FLAGS.coordinator_address, FLAGS.num_processes,
                           FLAGS.process_id, FLAGS.local_device_ids)
    from pairuni_jax.train.run import run

    run(FLAGS.config, FLAGS.workdir)


if __name__ == "__main__":
    app.run(main)
