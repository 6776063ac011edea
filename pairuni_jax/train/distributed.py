"""Multi-process start-up: `jax.distributed.initialize` from flags or the environment.

Call `initialize()` first thing in a job, before anything touches devices. Where it looks:
1. explicit arguments (flags) or JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID:
   a GPU cluster or local processes started by hand (coordinator 'host:port', process count, id);
2. SLURM (srun with SLURM_NTASKS > 1) or Open MPI (mpirun with OMPI_COMM_WORLD_SIZE > 1): JAX
   reads the coordinator, count and id from their variables itself;
3. a Cloud TPU VM (libtpu installed and TPU device files present): JAX asks the TPU metadata
   server, so one command runs unchanged on every worker of a pod slice;
4. otherwise one process, and nothing is initialised.
The decision (`resolve`) is a pure function of the arguments and the environment, so it is tested
without starting anything. Local multi-process runs on CPU (JAX_PLATFORMS=cpu) also switch on
gloo collectives, which cross-process arrays on CPU need.
"""

from __future__ import annotations

import dataclasses
import glob
import importlib.util
import os
from collections.abc import Mapping, Sequence

import jax
from absl import logging

MODES = ("auto", "on", "off")


@dataclasses.dataclass(frozen=True)
class Plan:
    """How this process joins (or not) a multi-process job.

    source: 'flags', 'env', 'slurm', 'openmpi', 'tpu', 'forced' (mode 'on' with nothing found:
    JAX's own detection decides) or 'single' (no-op). The other fields are passed to
    jax.distributed.initialize when set (None: JAX detects them).
    """

    source: str
    coordinator_address: str | None = None
    num_processes: int | None = None
    process_id: int | None = None
    local_device_ids: tuple[int, ...] | None = None
    cpu_collectives: bool = False

    @property
    def active(self) -> bool:
        return self.source != "single"

    def kwargs(self) -> dict[str, object]:
        """Keyword arguments for jax.distributed.initialize (unset ones left to JAX)."""
        names = ("coordinator_address", "num_processes", "process_id", "local_device_ids")
        return {n: getattr(self, n) for n in names if getattr(self, n) is not None}


def _int(value: str | int | None, name: str) -> int | None:
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{name}={value!r} is not an integer") from None


def parse_device_ids(value: str | Sequence[int] | None) -> tuple[int, ...] | None:
    """'0,1,2' (flag or env) or a sequence -> (0, 1, 2); None or '' -> None."""
    if value is None or value == "":
        return None
    if isinstance(value, str):
        try:
            return tuple(int(x) for x in value.split(",") if x.strip())
        except ValueError:
            raise ValueError(f"local_device_ids={value!r}: expected e.g. '0,1,2,3'") from None
    return tuple(int(x) for x in value)


def running_on_tpu_vm(env: Mapping[str, str], root: str = "/") -> bool:
    """A Cloud TPU VM: libtpu importable and TPU chips visible (/dev/accel* on v2-v4,
    /dev/vfio/<n> on v5e/v5p/v6e). Checked without starting a JAX backend."""
    if env.get("TPU_SKIP_MDS_QUERY"):
        return False
    if importlib.util.find_spec("libtpu") is None:
        return False
    devices = glob.glob(os.path.join(root, "dev", "accel*"))
    devices += glob.glob(os.path.join(root, "dev", "vfio", "[0-9]*"))
    return bool(devices)


def resolve(
    mode: str = "auto",
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    local_device_ids: str | Sequence[int] | None = None,
    env: Mapping[str, str] | None = None,
    on_tpu_vm: bool | None = None,
) -> Plan:
    """Decide how to initialise from arguments (flags) and the environment (default os.environ).

    mode 'off' never initialises; 'on' always does (failing if JAX cannot detect the cluster);
    'auto' initialises when a multi-process setting is found (see the module docstring).
    on_tpu_vm: override the TPU VM check (tests); None = `running_on_tpu_vm(env)`.
    """
    if mode not in MODES:
        raise ValueError(f"distributed mode {mode!r}: expected one of {MODES}")
    env = os.environ if env is None else env
    if mode == "off":
        return Plan("single")
    cpu = env.get("JAX_PLATFORMS", "").split(",")[0].strip() == "cpu"
    devices = parse_device_ids(local_device_ids)
    if devices is None:
        devices = parse_device_ids(env.get("JAX_LOCAL_DEVICE_IDS"))

    given = {
        "coordinator_address": coordinator_address,
        "num_processes": _int(num_processes, "num_processes"),
        "process_id": _int(process_id, "process_id"),
    }
    from_env = {
        "coordinator_address": env.get("JAX_COORDINATOR_ADDRESS") or None,
        "num_processes": _int(env.get("JAX_NUM_PROCESSES"), "JAX_NUM_PROCESSES"),
        "process_id": _int(env.get("JAX_PROCESS_ID"), "JAX_PROCESS_ID"),
    }
    explicit = {k: given[k] if given[k] is not None else from_env[k] for k in given}
    if any(v is not None for v in explicit.values()):
        missing = [k for k, v in explicit.items() if v is None]
        if missing:
            raise ValueError(
                f"multi-process start needs coordinator_address, num_processes and process_id "
                f"together (flags or JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / "
                f"JAX_PROCESS_ID); missing: {missing}"
            )
        n, pid, address = explicit["num_processes"], explicit["process_id"], explicit[
            "coordinator_address"]
        if n < 1 or not 0 <= pid < n:
            raise ValueError(f"process_id={pid} must be in [0, num_processes={n})")
        if ":" not in address:
            raise ValueError(f"coordinator_address={address!r}: expected 'host:port'")
        source = "flags" if any(v is not None for v in given.values()) else "env"
        if n == 1 and mode == "auto":
            return Plan("single")
        return Plan(source, address, n, pid, devices, cpu_collectives=cpu and n > 1)

    slurm_tasks = _int(env.get("SLURM_NTASKS"), "SLURM_NTASKS")
    if env.get("SLURM_JOB_ID") and env.get("SLURM_STEP_NODELIST") and (slurm_tasks or 0) > 1:
        return Plan("slurm", local_device_ids=devices, cpu_collectives=cpu)
    mpi_size = _int(env.get("OMPI_COMM_WORLD_SIZE"), "OMPI_COMM_WORLD_SIZE")
    if env.get("OMPI_MCA_orte_hnp_uri") and (mpi_size or 0) > 1:
        return Plan("openmpi", local_device_ids=devices, cpu_collectives=cpu)
    tpu = running_on_tpu_vm(env) if on_tpu_vm is None else on_tpu_vm
    if tpu and not cpu:
        return Plan("tpu")
    if mode == "on":
        return Plan("forced", local_device_ids=devices, cpu_collectives=cpu)
    return Plan("single")


def initialize(
    mode: str = "auto",
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    local_device_ids: str | Sequence[int] | None = None,
) -> Plan:
    """Join the multi-process job this process belongs to (no-op for a single process).

    Must run before anything touches devices. Safe to call twice (the second call does nothing).
    Returns the plan that was applied.
    """
    plan = resolve(mode, coordinator_address, num_processes, process_id, local_device_ids)
    if not plan.active or jax.distributed.is_initialized():
        return plan
    if plan.cpu_collectives:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    logging.info("jax.distributed.initialize (%s): %s", plan.source, plan.kwargs())
    jax.distributed.initialize(**plan.kwargs())
    logging.info(
        "process %d of %d, %d local / %d global devices", jax.process_index(),
        jax.process_count(), jax.local_device_count(), jax.device_count(),
    )
    return plan


def is_primary() -> bool:
    """True on process 0: the one that writes metrics, reports and logs."""
    return jax.process_index() == 0
