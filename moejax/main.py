"""Entry point: `python -m moejax.main --config=configs/default.py --workdir=DIR`.

Any config field can be overridden on the command line, e.g.
`--config.model.moe.num_experts=16 --config.train.steps=100` (ml_collections config_flags).
"""
from absl import app, flags, logging
from ml_collections import config_flags

from moejax.config import validate

_CONFIG = config_flags.DEFINE_config_file("config", "configs/default.py", "Config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", "runs/default", "Checkpoints and metrics go here.")
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed", False, "Several hosts: join them with jax.distributed before anything touches "
    "a device (auto-detected on TPU VMs, SLURM and Open MPI; or give the three flags below).")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None,
                                   "host:port of process 0 (implies --distributed).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in the job.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index.")


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)   # orbax logs every save at INFO
  config = _CONFIG.value
  from moejax import faults  # noqa: PLC0415
  if _DISTRIBUTED.value or _COORDINATOR.value:
    faults.initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value,
                                  heartbeat_timeout_s=config.train.heartbeat_timeout_s)
  try:
    validate(config)
    # Data fields are checked by building the host-side sources (no JAX work).
    from moejax import data
    sources = data.make_sources(config)
  except ValueError as e:   # ConfigError, and the data sources' errors naming their field
    raise app.UsageError(str(e)) from None
  # A bad flag has failed by now, before anything was compiled.
  from moejax import metrics, train
  # A dead peer ends this process at once with a clear message (exit code 75), instead of a
  # wait in jax's shutdown barrier (moejax/faults.py).
  with faults.exit_on_peer_loss():
    summary = train.train_and_evaluate(config, _WORKDIR.value, sources=sources)
  print("\n" + metrics.format_summary(summary))


if __name__ == "__main__":
  app.run(main)
