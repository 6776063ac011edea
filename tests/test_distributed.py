"""Multi-process start-up: how flags and the environment resolve, the no-op path, the main.py
flags, and two real local processes joining one job over CPU (gloo) collectives."""

import os
import socket
import subprocess
import sys
import textwrap

import jax
import pytest

from pairuni_jax.train import distributed
from pairuni_jax.train.distributed import Plan, resolve

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SLURM = {"SLURM_JOB_ID": "7", "SLURM_STEP_NODELIST": "node[1-2]", "SLURM_NTASKS": "2",
         "SLURM_PROCID": "1", "SLURM_LOCALID": "0"}
OPENMPI = {"OMPI_MCA_orte_hnp_uri": "1.0;tcp://10.0.0.1:4000", "OMPI_COMM_WORLD_SIZE": "4",
           "OMPI_COMM_WORLD_RANK": "3"}


def test_single_process_by_default():
    assert resolve(env={}, on_tpu_vm=False) == Plan("single")
    assert not Plan("single").active


def test_flags_give_the_coordinator_count_and_id():
    plan = resolve(coordinator_address="10.0.0.1:1234", num_processes=4, process_id=2,
                   local_device_ids="0,1", env={}, on_tpu_vm=False)
    assert plan == Plan("flags", "10.0.0.1:1234", 4, 2, (0, 1))
    assert plan.kwargs() == {"coordinator_address": "10.0.0.1:1234", "num_processes": 4,
                             "process_id": 2, "local_device_ids": (0, 1)}


def test_environment_variables_and_flags_override_them():
    env = {"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "1",
           "JAX_LOCAL_DEVICE_IDS": "3"}
    assert resolve(env=env, on_tpu_vm=False) == Plan("env", "h:1", 2, 1, (3,))
    assert resolve(process_id=0, env=env, on_tpu_vm=False) == Plan("flags", "h:1", 2, 0, (3,))


@pytest.mark.parametrize("kwargs, message", [
    (dict(num_processes=2, process_id=0), "missing: ['coordinator_address']"),
    (dict(coordinator_address="h:1", num_processes=2, process_id=2), "process_id=2"),
    (dict(coordinator_address="h", num_processes=2, process_id=0), "'host:port'"),
    (dict(coordinator_address="h:1", num_processes="two", process_id=0), "num_processes='two'"),
    (dict(local_device_ids="0,x", coordinator_address="h:1", num_processes=2, process_id=0),
     "local_device_ids"),
    (dict(mode="maybe"), "distributed mode"),
])
def test_incomplete_or_bad_settings_name_the_field(kwargs, message):
    with pytest.raises(ValueError) as err:
        resolve(env={}, on_tpu_vm=False, **kwargs)
    assert message in str(err.value)


def test_one_process_with_a_coordinator_is_a_no_op_unless_forced():
    args = dict(coordinator_address="h:1", num_processes=1, process_id=0, env={},
                on_tpu_vm=False)
    assert resolve(**args) == Plan("single")
    assert resolve(mode="on", **args).source == "flags"


def test_slurm_and_openmpi_leave_detection_to_jax():
    assert resolve(env=SLURM, on_tpu_vm=False) == Plan("slurm")
    assert resolve(env={**SLURM, "SLURM_NTASKS": "1"}, on_tpu_vm=False) == Plan("single")
    assert resolve(env=OPENMPI, on_tpu_vm=False) == Plan("openmpi")
    assert resolve(env=OPENMPI, on_tpu_vm=False).kwargs() == {}


def test_tpu_vm_pods_need_no_arguments():
    assert resolve(env={}, on_tpu_vm=True) == Plan("tpu")
    assert resolve(env={"JAX_PLATFORMS": "cpu"}, on_tpu_vm=True) == Plan("single")


def test_cpu_processes_switch_on_cpu_collectives():
    env = {"JAX_PLATFORMS": "cpu", "JAX_COORDINATOR_ADDRESS": "127.0.0.1:1",
           "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "0"}
    assert resolve(env=env, on_tpu_vm=False).cpu_collectives
    assert not resolve(env={**env, "JAX_PLATFORMS": "cuda"}, on_tpu_vm=False).cpu_collectives


def test_modes_off_and_on():
    assert resolve(mode="off", env=SLURM, on_tpu_vm=True) == Plan("single")
    assert resolve(mode="on", env={}, on_tpu_vm=False) == Plan("forced")


def test_tpu_vm_check_looks_for_device_files(tmp_path):
    assert not distributed.running_on_tpu_vm({}, root=str(tmp_path))
    (tmp_path / "dev").mkdir()
    (tmp_path / "dev" / "accel0").touch()
    assert not distributed.running_on_tpu_vm({"TPU_SKIP_MDS_QUERY": "1"}, root=str(tmp_path))


def test_initialize_is_a_no_op_for_one_process(monkeypatch):
    for name in [*SLURM, *OPENMPI, "JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES",
                 "JAX_PROCESS_ID"]:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("TPU_SKIP_MDS_QUERY", "1")
    assert distributed.initialize() == Plan("single")
    assert not jax.distributed.is_initialized()
    assert distributed.is_primary()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(devices: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "OMPI_"))}
    env.update(JAX_PLATFORMS="cpu", PYTHONPATH=REPO,
               XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    return env


def test_main_rejects_an_incomplete_cluster_before_any_work(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "pairuni_jax.main", "--config=configs/shapes.py:smoke",
         f"--workdir={tmp_path}", "--num_processes=2", "--process_id=0"],
        cwd=REPO, env=_env(1), capture_output=True, text=True, timeout=120)
    assert out.returncode != 0
    assert "missing: ['coordinator_address']" in out.stderr
    assert not os.listdir(tmp_path)


WORKER = textwrap.dedent("""
    import sys
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P
    from pairuni_jax.train import distributed
    plan = distributed.initialize(process_id=int(sys.argv[1]))
    mesh = jax.make_mesh((jax.device_count(),), ("data",))
    local = np.full((jax.local_device_count(),), jax.process_index() + 1.0, np.float32)
    x = jax.make_array_from_process_local_data(NamedSharding(mesh, P("data")), local)
    total = jax.jit(jnp.sum, out_shardings=NamedSharding(mesh, P()))(x)
    print(plan.source, plan.cpu_collectives, distributed.is_primary(), jax.process_count(),
          jax.device_count(), float(total))
""")


def test_two_local_processes_join_one_job():
    env = _env(2)
    env.update(JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{_free_port()}", JAX_NUM_PROCESSES="2")
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, str(i)], cwd=REPO, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(2)]
    outs = [p.communicate(timeout=180) for p in procs]
    for p, (_, stderr) in zip(procs, outs, strict=True):
        assert p.returncode == 0, stderr[-2000:]
    lines = [stdout.strip().splitlines()[-1].split() for stdout, _ in outs]  # after gloo's log
    # flags override env: source 'flags'; 2 processes x 2 devices; sum = 2 * 1 + 2 * 2
    assert lines[0] == ["flags", "True", "True", "2", "4", "6.0"]
    assert lines[1] == ["flags", "True", "False", "2", "4", "6.0"]


# ---------------------------------------------------------------- launch scripts


@pytest.mark.parametrize("script", ["tpu_vm.sh", "gpu.sh"])
def test_launch_scripts_parse_and_print_usage(script):
    path = os.path.join(REPO, "launch", script)
    subprocess.run(["bash", "-n", path], check=True)
    out = subprocess.run(["bash", path, "--help"], capture_output=True, text=True, check=True)
    assert out.stdout.startswith(f"usage: {script} COMMAND")
    assert "run " in out.stdout
    bad = subprocess.run(["bash", path, "no-such-command"], capture_output=True, text=True)
    assert bad.returncode == 2 and "usage:" in bad.stderr
