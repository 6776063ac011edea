"""One micro-scale Shapes workdir shared by the main-job, report, ablation and notebook tests.

`micro_run()` runs every stage once per test process (cached) in a temporary directory removed at
exit; tests that change a workdir copy it first (`copy_of_micro_run`).
"""

import atexit
import functools
import os
import shutil
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Flat overrides of configs/shapes.py:smoke (also written into the notebook's parameters).
MICRO_OVERRIDES = {
    "world.train_size": 24, "world.train_pairs": 12, "world.heldout_size": 12,
    "world.heldout_pairs": 4, "world.test_size": 4,
    "vq.steps": 4, "vq.warmup_steps": 1, "vq.batch_size": 8, "vq.num_images": 32,
    "vq.eval_per_category": 2,
    "sft.steps": 3, "sft.batch_size": 4, "sft.log_every": 1,
    "rl.steps": 2, "rl.pairs_per_batch": 2, "rl.group_size": 2, "rl.checkpoint_every": 1,
    "eval.num_understanding": 4, "eval.num_generation": 4,
}


def smoke_config():
    """configs/shapes.py:smoke as it is."""
    sys.path.insert(0, os.path.join(REPO, "configs"))
    try:
        import shapes
    finally:
        sys.path.pop(0)
    return shapes.get_config("smoke")


def micro_config():
    c = smoke_config()
    c.update_from_flattened_dict(MICRO_OVERRIDES)
    return c


@functools.cache
def micro_run() -> tuple[str, dict]:
    """(workdir, stage results) of one micro run of the whole Shapes job."""
    from pairuni_jax.train import run as run_lib

    workdir = tempfile.mkdtemp(prefix="pairuni_micro_")
    atexit.register(shutil.rmtree, workdir, True)
    return workdir, run_lib.run(micro_config(), workdir)


def copy_of_micro_run(dest: str) -> str:
    """A private copy of the shared micro workdir at `dest` (for tests that add to it)."""
    shutil.copytree(micro_run()[0], dest)
    return dest
