"""Checkpoints and preemption: a thin wrapper over orbax-checkpoint's `CheckpointManager`.

One checkpoint per saved step, laid out by orbax as
```
DIRECTORY/<step>/state/   the pytree of arrays (model state, optimizer state, RNG keys), OCDBT
DIRECTORY/<step>/extra/   a JSON dict (data iterator position, config, ...)
```
Completeness comes from orbax, not from us: a save writes into `<step>.orbax-checkpoint-tmp`
and becomes `<step>` only by an atomic rename after every byte is written (on object stores
without atomic rename orbax writes `commit_success.txt` last instead). Orbax never lists a tmp
directory as a step, so a run killed mid-save resumes from the previous complete checkpoint;
`tests/test_checkpoint.py` kills a saving process to check exactly that. Leftover tmp
directories are deleted when the next `Checkpointer` opens the directory (before anything else).

Not a paper implementation: infrastructure for the training loop (issue 2, section 7).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import threading
from typing import Any

import jax
import orbax.checkpoint as ocp

_STATE = "state"
_EXTRA = "extra"


class CheckpointWriteError(OSError):
  """Saving a checkpoint failed (a full disk, a failing write, a quota): the message names the
  step's directory, the underlying error and the previous complete checkpoint, which is intact
  (orbax only renames a finished save into place) and is the one a restart resumes from."""


class Checkpointer:
  """Saves the train state every `every` steps (and when forced), keeps the last `keep`.

  `state` is any pytree of `jax.Array`s: `nnx.state(model)`, the optax state, typed PRNG key
  arrays (`jax.random.key`: orbax 0.12 saves them natively; the restored impl is the one
  in `abstract_state`'s key dtype, e.g. key<fry>).
  `extra` is a JSON-serialisable dict saved beside it (the data source's `get_state()`, the
  config, ...). Saves are asynchronous: `save` returns once the arrays are copied off the
  device and the write continues in a background thread; `wait()` blocks until it is on disk.

  Typical use in the trainer::

      ckpt = Checkpointer(workdir / "checkpoints", keep=3, every=config.train.checkpoint_every)
      if ckpt.latest_step() is not None:
          step, state, extra = ckpt.restore(abstract_state=abstract)
      with PreemptionGuard() as guard:
          for step in range(step + 1, steps + 1):
              state = train_step(state, batch)
              ckpt.save(step, state, extra, force=guard.should_stop or step == steps)
              if guard.should_stop:
                  break
      ckpt.close()

  Args:
    directory: where the step directories go; created if missing.
    keep: how many of the most recent checkpoints to keep, >= 1.
    every: save when `step % every == 0`; 0 saves only when `save(..., force=True)`.
  """

  def __init__(self, directory: str | os.PathLike, *, keep: int, every: int):
    if not isinstance(keep, int) or isinstance(keep, bool) or keep < 1:
      raise ValueError(f"Checkpointer keep={keep!r}: allowed is an int >= 1")
    if not isinstance(every, int) or isinstance(every, bool) or every < 0:
      raise ValueError(
          f"Checkpointer every={every!r}: allowed is an int >= 1, or 0 to save only " "when forced"
      )
    self.directory = os.path.abspath(os.fspath(directory))
    self.keep = keep
    self.every = every
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep,
        # We decide when to save (see `save`) and always call orbax with force=True, so
        # orbax's own save policies stay out of it: by default they would also save the
        # very first step offered and any step after a preemption sync point.
        save_interval_steps=1,
        # Orbax's own clean-up (cleanup_tmp_directories=True) runs in a background thread
        # that nothing waits for, not even close(); `_delete_unfinished_saves` is synchronous.
        cleanup_tmp_directories=False,
        create=True,
    )
    _delete_unfinished_saves(self.directory)
    self._manager = ocp.CheckpointManager(
        self.directory, options=options, item_names=(_STATE, _EXTRA)
    )
    self._in_flight: int | None = None   # the step of the asynchronous save not yet waited for

  def save(self, step: int, state: Any, extra: dict, force: bool = False) -> bool:
    """Starts saving `state` and `extra` as checkpoint `step` if it is due.

    A save is due when `force` is true or `every > 0` and `step % every == 0`. A step that
    is already saved is skipped (a forced end-of-run save on a step that was just saved
    periodically), so this returns whether a save was started.

    Args:
      step: the number of train steps done, >= 0.
      state: pytree of `jax.Array`s (any shardings), including typed PRNG keys.
      extra: JSON-serialisable dict (str keys; ints, floats, strings, lists, dicts).
      force: save whatever the step (end of run, SIGTERM).

    Raises:
      ValueError: `step` is negative or below the latest saved step (a checkpoint
        directory holds one line of history; resume an older step into a new directory),
        or `extra` is not JSON-serialisable.
    """
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
      raise ValueError(f"Checkpointer.save step={step!r}: allowed is an int >= 0")
    if not (force or (self.every > 0 and step % self.every == 0)):
      return False
    latest = self.latest_step()
    if latest is not None and step == latest:
      return False
    if latest is not None and step < latest:
      raise ValueError(
          f"Checkpointer.save step={step}: allowed are steps > the latest saved step "
          f"{latest} in {self.directory}; to branch from an older step, save into a new "
          "directory"
      )
    if not isinstance(extra, dict):
      raise ValueError(f"Checkpointer.save extra={extra!r}: allowed is a dict")
    try:
      # Orbax's JsonSave fails deep in a thread pool on e.g. numpy ints; fail here.
      json.dumps(extra)
    except (TypeError, ValueError) as e:
      raise ValueError(
          f"Checkpointer.save extra={extra!r}: allowed is a JSON-serialisable dict "
          f"(convert numpy/jax values with int()/float()/.tolist()): {e}"
      ) from e
    # Orbax would wait for the save in flight anyway; its error (if any) surfaces here.
    self.wait()
    self._in_flight = step
    started = self._checked(lambda: self._manager.save(
        step,
        args=ocp.args.Composite(
            **{_STATE: ocp.args.StandardSave(state), _EXTRA: ocp.args.JsonSave(extra)}
        ),
        force=True,
    ))
    return started

  def latest_step(self) -> int | None:
    """The latest complete checkpoint's step, or None if there is none.

    Steps being saved asynchronously by this object count once `save` returned; steps
    whose save was interrupted (an unrenamed tmp directory) never count.
    """
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    """The steps of all complete checkpoints kept, ascending."""
    return sorted(self._manager.all_steps())

  def restore(self, step: int | None = None, *, abstract_state: Any) -> tuple[int, Any, dict]:
    """Restores checkpoint `step` (default: the latest) onto `abstract_state`'s shardings.

    Args:
      step: which checkpoint; None for the latest complete one.
      abstract_state: pytree with the structure of the saved state whose leaves are
        `jax.ShapeDtypeStruct`s with a `.sharding` (for example `jax.eval_shape` of the
        init function with the mesh's shardings filled in). The arrays come back with
        these shardings, whatever the shardings or mesh at save time.

    Returns:
      `(step, state, extra)`: the step restored, the state pytree of `jax.Array`s with the
      structure of `abstract_state`, and the JSON dict saved with it.

    Raises:
      FileNotFoundError: no complete checkpoint, or not at `step`.
      ValueError: a leaf of `abstract_state` is not a ShapeDtypeStruct with a sharding.
    """
    # Wait for our own in-flight save: restoring it before it is renamed would fail.
    self.wait()
    if step is None:
      step = self.latest_step()
      if step is None:
        raise FileNotFoundError(f"Checkpointer.restore: no complete checkpoint in {self.directory}")
    elif step not in self.all_steps():
      raise FileNotFoundError(
          f"Checkpointer.restore step={step}: allowed are the complete checkpoints "
          f"{self.all_steps()} in {self.directory}"
      )
    for path, leaf in jax.tree_util.tree_leaves_with_path(abstract_state):
      if not isinstance(leaf, jax.ShapeDtypeStruct) or leaf.sharding is None:
        raise ValueError(
            f"Checkpointer.restore abstract_state{jax.tree_util.keystr(path)}={leaf!r}: "
            "allowed is a jax.ShapeDtypeStruct with a sharding (the sharding to "
            "restore onto)"
        )
    restored = self._manager.restore(
        step,
        args=ocp.args.Composite(
            **{_STATE: ocp.args.StandardRestore(abstract_state), _EXTRA: ocp.args.JsonRestore()}
        ),
    )
    return step, restored[_STATE], dict(restored[_EXTRA])

  def wait(self) -> None:
    """Blocks until the save in flight (if any) is complete on disk.

    Raises:
      CheckpointWriteError: that save failed (see the class).
    """
    self._checked(self._manager.wait_until_finished)
    self._in_flight = None

  def close(self) -> None:
    """Waits for the save in flight and releases orbax's threads. Call once, at the end.

    Raises:
      CheckpointWriteError: the save in flight failed (orbax's threads are released anyway).
    """
    try:
      self.wait()
    finally:
      self._manager.close()

  def _checked(self, fn):
    """`fn()`, with an error of the save in flight turned into a `CheckpointWriteError`."""
    try:
      return fn()
    except Exception as e:  # noqa: BLE001  (orbax raises ValueError/OSError/RuntimeError)
      step, self._in_flight = self._in_flight, None
      if step is None:
        raise
      try:
        latest = self._manager.latest_step()
      except Exception:  # noqa: BLE001
        latest = None
      previous = (f"step {latest} ({os.path.join(self.directory, str(latest))})"
                  if latest is not None else "none")
      first = str(e).strip().splitlines()[0] if str(e).strip() else ""
      raise CheckpointWriteError(
          f"checkpoint step {step} could not be written to "
          f"{os.path.join(self.directory, str(step))} ({type(e).__name__}: {first}). The "
          f"latest complete checkpoint is {previous}, intact; a restart resumes from it. "
          "Free space (or fix the write error) in " + self.directory) from e

  def __enter__(self) -> Checkpointer:
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def _delete_unfinished_saves(directory: str) -> None:
  """Deletes the `<step>.orbax-checkpoint-tmp` directories that killed saves leave behind.

  Orbax never lists them as steps; deleting them just frees the space. Single host: on
  several hosts only the primary one may do this, before the others open the directory.
  """
  if jax.process_index() != 0 or not os.path.isdir(directory):
    return
  for name in os.listdir(directory):
    path = os.path.join(directory, name)
    if ocp.path.atomicity.TMP_DIR_SUFFIX in name and os.path.isdir(path):
      shutil.rmtree(path)


class PreemptionGuard:
  """Context manager turning SIGTERM (and optionally SIGINT) into a flag the loop polls.

  The handler only sets `should_stop`: the train loop checks it once per step, saves a
  checkpoint with `force=True` and returns normally, so the process exits 0 with a complete
  checkpoint at the step it stopped. Signal handlers run between Python bytecodes of the main
  thread, so a signal arriving during a jitted step is seen when the step returns. The
  previous handlers are restored on exit.

  With `sigint=True` the first Ctrl-C also stops gracefully, and a second one raises
  `KeyboardInterrupt` as usual (so a hung run can still be interrupted).

  Multi-host: a SIGTERM reaches hosts at different steps, and every host must save the same
  step. There, replace the flag by
  `jax.experimental.multihost_utils.reached_preemption_sync_point(step)` (needs
  `jax.distributed.initialize` and the coordination service's preemption notice), which
  returns True on all hosts at the same step; orbax's `CheckpointManager` uses it too. Not
  needed on one host, which is all this class handles.

  Must be entered from the main thread (Python only lets the main thread set handlers).
  """

  def __init__(self, *, sigint: bool = False):
    self._signals = (signal.SIGTERM, signal.SIGINT) if sigint else (signal.SIGTERM,)
    self._previous: dict[int, Any] = {}
    self.should_stop = False
    self.signal_received: int | None = None

  def _handle(self, signum, frame):
    if signum == signal.SIGINT and self.should_stop:
      raise KeyboardInterrupt
    self.should_stop = True
    self.signal_received = signum

  def __enter__(self) -> PreemptionGuard:
    if threading.current_thread() is not threading.main_thread():
      raise RuntimeError(
          "PreemptionGuard entered from thread "
          f"{threading.current_thread().name!r}: allowed is the main thread only"
      )
    for s in self._signals:
      self._previous[s] = signal.signal(s, self._handle)
    return self

  def __exit__(self, *exc) -> None:
    for s, handler in self._previous.items():
      signal.signal(s, handler)
    self._previous.clear()
