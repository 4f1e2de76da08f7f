"""Several processes, one job: `jax.distributed` set up from flags or the environment.

`sparsevlm eval` runs data-parallel over processes (one per host, or several on one host):
each process joins the others through `jax.distributed.initialize` (process 0 runs the
coordinator at `--coordinator HOST:PORT`), answers its share of the questions on its own local
devices (`--mesh` describes those) and meets the others at barriers of the coordination
service (`barrier`) before process 0 merges the answers (`sparsevlm_jax.eval`). No collective
runs over the processes' devices: the questions are independent, so only the barriers and the
shared answers directory connect the processes.

The three settings come from flags, else from the environment variables that JAX's own
launch examples use: `JAX_COORDINATOR_ADDRESS`, `JAX_NUM_PROCESSES`, `JAX_PROCESS_ID`.
On CPU the processes talk through gloo (`jax_cpu_collectives_implementation`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

from sparsevlm_jax.errors import InputError

ENV = {
    "coordinator": "JAX_COORDINATOR_ADDRESS",
    "num_processes": "JAX_NUM_PROCESSES",
    "process_id": "JAX_PROCESS_ID",
}
FLAGS = {
    "coordinator": "--coordinator",
    "num_processes": "--num-processes",
    "process_id": "--process-id",
}
CONNECT_TIMEOUT_S = 300  # how long processes wait for each other at start
# Processes that finish their share early wait for the slowest at a barrier; a dead process is
# noticed by the coordination service's heartbeats long before this.
BARRIER_TIMEOUT_S = 7 * 24 * 3600


@dataclass(frozen=True)
class Cluster:
    """Which process this is, of how many, and where process 0's coordinator listens."""

    num_processes: int = 1
    process_id: int = 0
    coordinator: str | None = None

    @property
    def multi(self) -> bool:
        """True when several processes share the work (`jax.distributed` is needed)."""
        return self.num_processes > 1


def cluster_from(
    coordinator: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    environ: Mapping[str, str] | None = None,
) -> Cluster:
    """The cluster that the flags (None: not given) and else the environment describe.

    Raises:
      InputError: a value that is not a number, a process count below 1, a process id out of
        range, an id or coordinator without a process count, several processes without a
        coordinator or an id, a coordinator that is not HOST:PORT.
    """
    env = os.environ if environ is None else environ
    given = {"coordinator": coordinator, "num_processes": num_processes, "process_id": process_id}
    names = {k: FLAGS[k] for k in given}
    for key, value in list(given.items()):
        if value is None and env.get(ENV[key], "").strip():
            given[key], names[key] = env[ENV[key]].strip(), ENV[key]
    n = _integer(given["num_processes"], names["num_processes"])
    p = _integer(given["process_id"], names["process_id"])
    address = given["coordinator"]
    if n is None:
        for key in ("process_id", "coordinator"):
            if given[key] is not None and not (key == "process_id" and p == 0):
                raise InputError(
                    f"{names[key]} needs the process count (--num-processes or "
                    f"{ENV['num_processes']})"
                )
        return Cluster()
    if n < 1:
        raise InputError(f"{names['num_processes']} must be >= 1, got {n}")
    if p is not None and not 0 <= p < n:
        raise InputError(f"{names['process_id']} must be in 0..{n - 1}, got {p}")
    if n == 1:
        return Cluster()
    if p is None:
        raise InputError(
            f"{n} processes: say which one this is (--process-id or {ENV['process_id']})"
        )
    if address is None:
        raise InputError(
            f"{n} processes need process 0's address (--coordinator HOST:PORT or "
            f"{ENV['coordinator']})"
        )
    check_address(address, names["coordinator"])
    return Cluster(n, p, address)


def _integer(value: int | str | None, name: str) -> int | None:
    if value is None or isinstance(value, int):
        return value
    try:
        return int(value)
    except ValueError:
        raise InputError(f"{name} must be an integer, got {value!r}") from None


def check_address(address: str, name: str = "--coordinator") -> None:
    """Raises InputError unless `address` is HOST:PORT with a port in 1..65535."""
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise InputError(f"{name} must be HOST:PORT (e.g. 10.0.0.1:1234), got {address!r}")


def initialize(cluster: Cluster, timeout_s: int = CONNECT_TIMEOUT_S) -> None:
    """Joins the other processes (`jax.distributed.initialize`); nothing for one process.

    Must run before anything touches a JAX device. On CPU the processes use gloo unless
    `JAX_CPU_COLLECTIVES_IMPLEMENTATION` says otherwise. Every process keeps all its local
    devices; computations stay on them (meshes are made of `jax.local_devices()`). SIGTERM
    ends the process, as without JAX (`restore_sigterm`).

    Raises:
      InputError: JAX already runs in this process, or the processes did not all connect to
        the coordinator within `timeout_s` (the error's first line).
    """
    if not cluster.multi:
        return
    import jax

    if not os.environ.get("JAX_CPU_COLLECTIVES_IMPLEMENTATION"):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    try:
        jax.distributed.initialize(
            coordinator_address=cluster.coordinator,
            num_processes=cluster.num_processes,
            process_id=cluster.process_id,
            initialization_timeout=timeout_s,
        )
    except RuntimeError as e:
        if "must be called before" in str(e) or "only be called once" in str(e):
            raise InputError(
                "several processes: JAX already runs in this process; start each one in a "
                "fresh process"
            ) from None
        raise _connect_error(cluster, e) from None
    except Exception as e:  # the coordination service's errors (timeouts, refused, ...)
        raise _connect_error(cluster, e) from None
    restore_sigterm()


def restore_sigterm() -> None:
    """Lets SIGTERM end the process again.

    `jax.distributed.initialize` starts JAX's preemption notifier, which catches SIGTERM and
    only records it, so a scheduler's SIGTERM would not stop an eval. Answers are on disk batch
    by batch, so ending at once loses at most the batch in flight; a rerun resumes.
    """
    import signal
    import threading

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _connect_error(cluster: Cluster, e: Exception) -> InputError:
    first = (str(e).strip().splitlines() or [type(e).__name__])[0]
    return InputError(
        f"process {cluster.process_id} of {cluster.num_processes} could not join the others "
        f"at {cluster.coordinator}: {first}"
    )


def barrier(name: str, timeout_s: int = BARRIER_TIMEOUT_S) -> None:
    """Waits until every process has reached the barrier `name` (each name used once).

    The coordination service's barrier (what orbax uses between processes): no device
    computation, a timeout of our choosing. With one process this does nothing.
    """
    import jax
    from jax._src import distributed as jax_distributed

    client = getattr(getattr(jax_distributed, "global_state", None), "client", None)
    if client is not None:
        client.wait_at_barrier(name, int(timeout_s * 1000))
    elif jax.process_count() > 1:  # a JAX without that client: a tiny all-gather instead
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)
