"""One process of a local multi-process Pair-GRPO run on CPU (started by tests/test_multihost.py).

    python tests/multihost_worker.py WORLD_DIR WORKDIR PROCESS_ID NUM_PROCESSES PORT

Each process forces 4 CPU devices, joins the job through pairuni_jax.train.distributed
(coordinator 127.0.0.1:PORT, gloo collectives), reads its own shard of the tiny world's pairs and
runs `rl_tiny.STEPS` steps on a (data 2, fsdp 2, tensor 2) mesh over all processes' devices.
"""

import os
import sys

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"
).strip()
os.environ["JAX_PLATFORMS"] = "cpu"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import rl_tiny  # noqa: E402

from pairuni_jax.train import distributed  # noqa: E402
from pairuni_jax.train import rl as rl_lib  # noqa: E402


def main(world_dir: str, workdir: str, process_id: int, num_processes: int, port: int) -> None:
    distributed.initialize(
        coordinator_address=f"127.0.0.1:{port}", num_processes=num_processes, process_id=process_id
    )
    assert jax.process_count() == num_processes and jax.device_count() == 4 * num_processes
    pairs = rl_tiny.write_tiny_world(world_dir)  # already written by the test: read only
    proc = rl_tiny.processor(world_dir)
    config = rl_tiny.model_config(len(proc.tokenizer))
    per_process = rl_tiny.MULTIHOST_PAIRS // num_processes
    pipe = rl_tiny.pipeline(pairs, proc, per_process, process_id, num_processes)
    rl_lib.train_rl(
        rl_tiny.init_params(config),
        config,
        proc,
        pipe,
        rl_tiny.BrightnessReward(),
        rl_tiny.multihost_config(),
        workdir,
        log=lambda s: None,
    )
    jax.distributed.shutdown()


if __name__ == "__main__":
    world, out, pid, n, port = sys.argv[1:]
    main(world, out, int(pid), int(n), int(port))
