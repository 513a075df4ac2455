"""Multi-process runs on JAX's own runtime (`jax.distributed`): one process per host (or per accelerator),
every process's devices in one global mesh (`--mesh` spans them all), results written by process 0 only
(`plip_jax.util.io.is_writer`).

    # two hosts, 8 GPUs each: the same command on both, process_id 0 and 1
    python -m bin.layer_scan --mesh=data:16 --coordinator_address=host0:12355 --num_processes=2 --process_id=0

On Slurm, Open MPI, Kubernetes or Cloud TPU, `--distributed` lets JAX detect all three values. On CPU the
cross-process collectives use gloo (JAX's default for `jax_cpu_collectives_implementation`).
"""

from __future__ import annotations

import os

from absl import flags

from plip_jax.core.errors import FlagError
from plip_jax.util import progress

FLAGS = flags.FLAGS
flags.disclaim_key_flags()  # the flags below belong to the binary that calls define_flags

ENV = {"coordinator_address": "JAX_COORDINATOR_ADDRESS", "num_processes": "JAX_NUM_PROCESSES",
       "process_id": "JAX_PROCESS_ID"}


def define_flags() -> None:
    """--coordinator_address, --num_processes, --process_id and --distributed (model binaries with --mesh)."""
    flags.DEFINE_string("coordinator_address", None, "Multi-process run (one process per host): host:port of "
                        "process 0's coordinator, the same on every process ($JAX_COORDINATOR_ADDRESS). "
                        "Unset: a single process.")
    flags.DEFINE_integer("num_processes", None, "Multi-process run: how many processes ($JAX_NUM_PROCESSES).")
    flags.DEFINE_integer("process_id", None, "Multi-process run: this process's index 0..num_processes-1 "
                         "($JAX_PROCESS_ID); process 0 writes the results.")
    flags.DEFINE_bool("distributed", False, "Multi-process run with the three values detected by JAX from the "
                      "cluster (Slurm, Open MPI, Kubernetes, Cloud TPU).")


def _value(name: str):
    if name in FLAGS and FLAGS[name].value is not None:
        return FLAGS[name].value
    env = os.environ.get(ENV[name])
    if env in (None, ""):
        return None
    if name == "coordinator_address":
        return env
    try:
        return int(env)
    except ValueError:
        raise FlagError(f"${ENV[name]}={env!r} is not an integer") from None


def settings() -> dict:
    """The multi-process settings from the flags (else the environment); {} for a single-process run."""
    values = {name: _value(name) for name in ENV}
    auto = "distributed" in FLAGS and FLAGS.distributed
    if not auto and all(v is None for v in values.values()):
        return {}
    n, pid = values["num_processes"], values["process_id"]
    if not auto and None in values.values():
        missing = [f"--{k}" for k, v in values.items() if v is None]
        raise FlagError(f"a multi-process run needs --coordinator_address, --num_processes and --process_id "
                        f"(or their $JAX_* variables, or --distributed on a cluster JAX detects); missing "
                        f"{', '.join(missing)}")
    if n is not None and n < 1:
        raise FlagError(f"--num_processes={n} must be >= 1")
    if pid is not None and n is not None and not 0 <= pid < n:
        raise FlagError(f"--process_id={pid} must be in 0..{n - 1} (--num_processes={n})")
    return {k: v for k, v in values.items() if v is not None}


def initialize() -> bool:
    """Join the multi-process run the flags describe (before any JAX computation); False for a single
    process. Prints which process this is and how many devices it sees."""
    cfg = settings()
    if not cfg and not ("distributed" in FLAGS and FLAGS.distributed):
        return False
    import jax

    if not jax.distributed.is_initialized():
        jax.distributed.initialize(**cfg)
    progress.note(f"process {jax.process_index()} of {jax.process_count()}: {jax.local_device_count()} local "
                  f"device(s), {jax.device_count()} in all; process 0 writes the results")
    return True
