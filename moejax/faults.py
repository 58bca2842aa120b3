"""Faults the training loop survives or reports: non-finite steps, preemption on several hosts, a
dead peer. Used by `moejax.train.train_and_evaluate`; the timeouts are documented here.

Non-finite values (`train.nan_policy`)
  The train step runs inside `guarded_step`, which also checks on the device that the step's
  metrics (loss, aux loss, global grad norm, per-layer MoE metrics) are finite, and keeps the
  first bad step's metrics in a small
  replicated `guard` dict. The host reads the guard only where it syncs anyway (log, eval and
  checkpoint steps, a stop), so dispatch stays asynchronous and the step named is still exact.
  - `halt` (default): `NonFiniteError` naming the step, the batch's index in the train stream,
    the first non-finite metric and the first MoE layer with a non-finite metric (the forward
    pass goes through the layers in order, so that is where the values went bad; a finite loss
    with a non-finite `train/grad_norm` points at the backward pass). It is raised before any later checkpoint is written, so the
    latest checkpoint is the last good one.
  - `skip`: a non-finite step keeps the previous params and optimizer state (the batch is used up
    and the step counter advances, so the data order and the learning-rate schedule stay those of
    the run), and `train/skipped_steps` counts it. More than `train.max_skipped_steps` non-finite
    steps in a row raise `NonFiniteError` as `halt` does.

Preemption on several hosts
  SIGTERM reaches processes at different steps, and each process only sets a local flag
  (`checkpoint.PreemptionGuard`). Every `train.preemption_check_every` steps all processes
  all-gather their flags (`any_process`, one tiny collective), so they all stop after the same
  step, save that step together and return normally (exit 0). A SIGTERM is acted on at most
  `preemption_check_every` steps after it arrives: keep that many steps well inside the grace
  period of the scheduler (often 30 s).

A dead peer: timeouts
  When a process dies (SIGKILL, OOM, a lost host), the survivors' next collective fails (gloo over
  TCP reports the reset connection at once), and `train_and_evaluate` raises `PeerLostError`
  naming the step and the last complete checkpoint. `initialize_distributed` sets the coordination
  service's heartbeat timeout (`heartbeat_timeout_s`, default `HEARTBEAT_TIMEOUT_S`): a process
  that is blocked elsewhere (a barrier, a collective that does not fail, jax's shutdown barrier
  waiting for the dead peer) is aborted by the coordination service at most that long after the
  peer's last heartbeat (exit by SIGABRT). `exit_on_peer_loss` turns `PeerLostError` into a
  message on stderr and `os._exit(EXIT_PEER_LOST)`, skipping jax's shutdown barrier, which would
  wait for the dead peer. So a survivor exits non-zero within one train step plus a collective
  when its collectives fail, and never later than `heartbeat_timeout_s` after the death.
  Checkpoints stay complete: orbax renames a step's directory only after every process wrote its
  part, so a death mid-save leaves a tmp directory that no restore lists.

Not a paper implementation: infrastructure for the training loop (issue 10).
"""
from __future__ import annotations

import contextlib
import os
import re
import sys
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

HEARTBEAT_TIMEOUT_S = 60
EXIT_PEER_LOST = 75   # EX_TEMPFAIL: a restart of the whole job can resume


class NonFiniteError(RuntimeError):
  """A train step produced NaN or Inf (`train.nan_policy`); the message says where."""


class PeerLostError(RuntimeError):
  """A collective failed in a multi-process run: another process died or was cut off."""


# ----------------------------------------------------------------------------- non-finite steps

def _all_finite(tree) -> jax.Array:
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
            if jnp.issubdtype(x.dtype, jnp.inexact)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


def guarded_step(train_step: Callable, *, skip: bool) -> Callable:
  """Wraps `train_step(state, batch) -> (state, out)` with the non-finite check (module doc).

  Returns a jitted `step(state, guard, batch) -> (state, guard, out)`; `state` and `guard` are
  donated. `out` gains `train/skipped_steps` (the count so far) when `skip`. With `skip`, a
  non-finite step returns the input params and optimizer state (`jnp.where` per leaf) and only
  the step counter and the guard change.
  """

  def step(state, guard, batch):
    new, out = train_step(state, batch)
    # The metrics are replicated scalars, so this costs no collective; they cover the whole
    # update: a non-finite gradient anywhere makes train/grad_norm non-finite, and a finite
    # clipped gradient gives a finite AdamW update.
    ok = _all_finite(out)
    first = (guard["first_bad_step"] == 0) & ~ok
    pick = lambda a, b: jax.tree.map(lambda x, y: jnp.where(first, x, y), a, b)
    in_row = jnp.where(ok, 0, guard["in_row"] + 1)
    guard = {"first_bad_step": jnp.where(first, new["step"], guard["first_bad_step"]),
             "first_bad_out": pick(out, guard["first_bad_out"]),
             "in_row": in_row, "max_in_row": jnp.maximum(guard["max_in_row"], in_row),
             "max_in_row_step": jnp.where(in_row > guard["max_in_row"], new["step"],
                                          guard["max_in_row_step"]),
             "skipped": guard["skipped"] + (~ok).astype(jnp.int32)}
    if skip:
      keep = {k: v for k, v in state.items() if k != "step"}
      kept = jax.tree.map(lambda n, o: jnp.where(ok, n, o),
                          {k: new[k] for k in keep}, keep)
      new = {**new, **kept}
      out = {**out, "train/skipped_steps": guard["skipped"]}
    return new, guard, out

  return jax.jit(step, donate_argnums=(0, 1))


def init_guard(train_step: Callable, state, batch, *, skipped: int = 0, in_row: int = 0):
  """The guard before the first step (or after a resume with `skipped`, `in_row` from the
  checkpoint's extra), replicated on the mesh of `state["step"]`. `batch`: any device batch
  (only its shapes are used)."""
  out = jax.eval_shape(train_step, state, batch)[1]

  def make():
    return {"first_bad_step": jnp.zeros((), jnp.int32),
            "first_bad_out": jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), out),
            "in_row": jnp.asarray(in_row, jnp.int32),
            "max_in_row": jnp.asarray(in_row, jnp.int32),
            "max_in_row_step": jnp.zeros((), jnp.int32),
            "skipped": jnp.asarray(skipped, jnp.int32)}

  return jax.jit(make, out_shardings=state["step"].sharding)()


def _natural_key(name: str):
  return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


def nonfinite_report(guard: dict, *, policy: str, max_skipped_steps: int) -> str | None:
  """None if the run may go on under `policy`, else the reason to halt, in words.

  Args:
    guard: the guard from `guarded_step`, fetched to the host (`jax.device_get`).
  """
  first = int(guard["first_bad_step"])
  if first == 0:
    return None
  if policy == "skip" and int(guard["max_in_row"]) <= max_skipped_steps:
    return None
  if policy == "skip":
    last = int(guard["max_in_row_step"])
    head = (f"train.nan_policy='skip': {int(guard['max_in_row'])} non-finite steps in a row up "
            f"to step {last}, more than train.max_skipped_steps={max_skipped_steps}; the first "
            f"non-finite step of the run was step {first}")
  else:
    head = f"train.nan_policy='halt': non-finite values at step {first}"
  out = guard["first_bad_out"]
  order = ([k for k in ("train/loss", "train/aux_loss", "train/grad_norm") if k in out]
           + sorted((k for k in out if k.startswith("moe/")), key=_natural_key)
           + sorted(k for k in out if not k.startswith(("moe/", "train/loss", "train/aux_loss",
                                                        "train/grad_norm"))))
  bad = [k for k in order if not np.all(np.isfinite(np.asarray(out[k], np.float64)))]
  bad_layers = [k.split("/")[1] for k in bad if k.startswith("moe/")]
  parts = [head,
           f"batch {first - 1} of the train data stream (0-based; a resume replays the same "
           "batches, so this one comes again)",
           "first non-finite metric: " + (f"{bad[0]} = {np.asarray(out[bad[0]]).tolist()}"
                                          if bad else "none (all metrics finite)"),
           "first MoE layer with a non-finite metric: "
           + (bad_layers[0] if bad_layers else "none")]
  return "; ".join(parts)


# --------------------------------------------------------------------------- several processes

def any_process(flag: bool) -> bool:
  """Whether `flag` is true on any process (a collective: every process must call it at the
  same point). One process: `flag` itself, with no device work."""
  if jax.process_count() == 1:
    return bool(flag)
  from jax.experimental import multihost_utils  # noqa: PLC0415
  return bool(np.any(multihost_utils.process_allgather(np.asarray(flag, np.int32))))


def initialize_distributed(coordinator_address: str | None = None,
                           num_processes: int | None = None, process_id: int | None = None, *,
                           heartbeat_timeout_s: int = HEARTBEAT_TIMEOUT_S,
                           initialization_timeout_s: int = 300) -> None:
  """`jax.distributed.initialize` with the timeouts of the module doc: a process that stops
  sending heartbeats for `heartbeat_timeout_s` seconds is declared dead and every other process
  is aborted (jax's default is 100 s); processes that have not all joined after
  `initialization_timeout_s` fail to start. With no coordinator, process count or id, jax
  finds them itself (TPU VMs, SLURM, Open MPI)."""
  for name, v in (("heartbeat_timeout_s", heartbeat_timeout_s),
                  ("initialization_timeout_s", initialization_timeout_s)):
    if not isinstance(v, int) or isinstance(v, bool) or v < 1:
      raise ValueError(f"initialize_distributed {name}={v!r}: allowed is an int >= 1 (seconds)")
  jax.distributed.initialize(coordinator_address, num_processes=num_processes,
                             process_id=process_id, heartbeat_timeout_seconds=heartbeat_timeout_s,
                             initialization_timeout=initialization_timeout_s)


def peer_lost(error: BaseException, step: int, checkpoints: str, latest: int | None) -> \
    PeerLostError:
  """The `PeerLostError` for a runtime `error` raised around train step `step`."""
  first_line = str(error).strip().splitlines()[0] if str(error).strip() else repr(error)
  return PeerLostError(
      f"process {jax.process_index()} of {jax.process_count()}: a collective failed at or "
      f"shortly after train step {step}, most likely because another process died or lost its "
      f"network ({type(error).__name__}: {first_line}). Not saving (the other processes' parts "
      f"are missing). Latest complete checkpoint: "
      + (f"step {latest} in {checkpoints}" if latest is not None else f"none in {checkpoints}")
      + "; restart the whole job to resume from it.")


@contextlib.contextmanager
def exit_on_peer_loss(code: int = EXIT_PEER_LOST):
  """Around a multi-process entry point: a `PeerLostError` prints its message to stderr and
  ends the process with `os._exit(code)` at once, instead of waiting in jax's shutdown barrier
  for the dead peer (up to the heartbeat timeout) and then aborting."""
  try:
    yield
  except PeerLostError as e:
    print(f"PeerLostError: {e}", file=sys.stderr, flush=True)
    os._exit(code)


def runtime_errors() -> tuple[type[BaseException], ...]:
  """The exception types a failed collective raises (jax's runtime error)."""
  types: list[Any] = [getattr(jax.errors, "JaxRuntimeError", None)]
  return tuple(t for t in types if t is not None) or (RuntimeError,)


@contextlib.contextmanager
def peer_loss_as_error(ckpt, current_step: Callable[[], int]):
  """Around the train loop: in a multi-process run, a jax runtime error (a failed collective: a
  peer died) becomes `PeerLostError` naming the step and the latest complete checkpoint of
  `ckpt` (a `checkpoint.Checkpointer`). One process: errors pass unchanged."""
  try:
    yield
  except runtime_errors() as e:
    if jax.process_count() == 1:
      raise
    raise peer_lost(e, current_step(), ckpt.directory, ckpt.latest_step()) from e
