"""One process of a multi-process CPU run, for tests/test_multihost.py (not a test module).

    python tests/multihost_worker.py PROCESS_ID NUM_PROCESSES PORT WORKDIR OVERRIDES_JSON STOP_AFTER

Each process owns 8 / NUM_PROCESSES simulated CPU devices; `jax.distributed` joins them into one
8-device job over localhost (gloo collectives), which is how moejax runs on several hosts. The
config is configs/default.py with the JSON dotted-name overrides; STOP_AFTER 0 trains to the end.
Prints one line `SUMMARY {...}` with the run summary's scalars. The heartbeat timeout is the
config's `train.heartbeat_timeout_s`; a lost peer ends the process with exit code
`faults.EXIT_PEER_LOST` and a `PeerLostError` line on stderr (moejax/faults.py).
"""
import json
import os
import sys


def main(argv):
  pid, nproc, port, workdir, overrides, stop_after = argv
  pid, nproc, stop_after = int(pid), int(nproc), int(stop_after)
  os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={8 // nproc}"
  import jax  # noqa: PLC0415  (after XLA_FLAGS)
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  cache = os.environ.get("MOEJAX_TEST_JAX_CACHE")
  if cache:
    jax.config.update("jax_compilation_cache_dir", cache)
  sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
  from helpers import load_config  # noqa: PLC0415
  from moejax import faults  # noqa: PLC0415
  from moejax.train import train_and_evaluate  # noqa: PLC0415
  config = load_config(**json.loads(overrides))
  faults.initialize_distributed(f"localhost:{port}", nproc, pid,
                                heartbeat_timeout_s=config.train.heartbeat_timeout_s)
  with faults.exit_on_peer_loss():
    summary = train_and_evaluate(config, workdir, progress=False, stop_after=stop_after or None)
  scalars = {k: v for k, v in summary.items() if isinstance(v, (bool, int, float, str))}
  print("SUMMARY " + json.dumps({"process": jax.process_index(), **scalars}), flush=True)
  jax.distributed.shutdown()


if __name__ == "__main__":
  main(sys.argv[1:])
