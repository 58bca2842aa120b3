"""NaN/Inf steps (`train.nan_policy`, moejax/faults.py): a test-only Trainer poisons one parameter
(layer 1's attention query weights) going into chosen steps, so the forward pass goes bad from
layer 1 on. `halt` names the step, the batch, the first bad metric and the layer (layer_1, not 0),
and leaves the last good checkpoint as the latest; `skip` drops exactly the poisoned updates
(the checkpointed params after them are bitwise those before) and halts past
`train.max_skipped_steps` in a row."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import moejax.model
import moejax.train
from moejax import checkpoint, faults
from moejax.metrics import read_metrics
from moejax.train import Trainer, train_and_evaluate

from test_train import tiny_config

POISONED = "blocks/1/attn/wq"


@jax.custom_vjp
def _nan_gradient(x):
  """The identity, whose gradient is NaN: a fault of the backward pass only."""
  return x


_nan_gradient.defvjp(lambda x: (x, None), lambda _, g: (g * jnp.nan,))


def _poisoning_trainer(bad_steps):
  """A Trainer whose train step multiplies POISONED by NaN going into steps `bad_steps`
  (1-based step numbers, as logged)."""

  class Poisoned(Trainer):
    def __init__(self, config, mesh=None):
      super().__init__(config, mesh)
      clean = self.train_step

      def step(state, batch):
        bad = jnp.isin(state["step"] + 1, jnp.asarray(bad_steps))
        factor = jnp.where(bad, jnp.nan, 1.0)
        params = jax.tree_util.tree_map_with_path(
            lambda path, x: x * factor if _path(path) == POISONED else x, state["params"])
        return clean({**state, "params": params}, batch)

      self.train_step = step

  return Poisoned


def _path(path) -> str:
  return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


def _steps(workdir):
  return sorted(int(p) for p in os.listdir(os.path.join(workdir, "checkpoints")) if p.isdigit())


def test_halt_names_the_step_layer_and_batch_and_keeps_the_last_good_checkpoint(
    tmp_path, monkeypatch):
  # Host checks at steps 3, 4 (save), 6 (log): the NaN of step 5 is seen at 6, named as 5.
  config = tiny_config(**{"train.log_every": 3, "train.checkpoint_every": 4,
                          "train.eval_every": 100, "train.steps": 8})
  assert config.train.nan_policy == "halt"   # the default
  monkeypatch.setattr(moejax.train, "Trainer", _poisoning_trainer([5]))
  workdir = str(tmp_path)
  with pytest.raises(faults.NonFiniteError) as e:
    train_and_evaluate(config, workdir, progress=False)
  msg = str(e.value)
  for part in ("non-finite values at step 5", "batch 4 of the train data stream",
               "first non-finite metric: train/loss = nan",
               "first MoE layer with a non-finite metric: layer_1",
               "latest checkpoint is step 4"):
    assert part in msg, (part, msg)
  assert _steps(workdir) == [4]
  assert not [p for p in os.listdir(os.path.join(workdir, "checkpoints")) if "tmp" in p]
  assert max(r["step"] for r in read_metrics(workdir)) == 3   # no line from a bad step
  # A restart without the fault resumes from step 4 and finishes.
  monkeypatch.setattr(moejax.train, "Trainer", Trainer)
  summary = train_and_evaluate(config, workdir, progress=False)
  assert summary["step"] == 8 and np.isfinite(summary["eval/loss"])
  assert sorted(r["step"] for r in read_metrics(workdir) if "train/loss" in r) == [3, 6, 8]


def test_halt_on_a_gradient_that_alone_is_non_finite(tmp_path, monkeypatch):
  """A NaN only in the backward pass (every RMSNorm passes a NaN gradient; the loss and the
  layer metrics stay finite) is caught by the global gradient norm, and named so."""
  config = tiny_config(**{"train.steps": 4, "train.checkpoint_every": 1, "train.eval_every": 100})
  forward = moejax.model.RMSNorm.__call__
  monkeypatch.setattr(moejax.model.RMSNorm, "__call__",
                      lambda self, x: _nan_gradient(forward(self, x)))
  with pytest.raises(faults.NonFiniteError) as e:
    train_and_evaluate(config, str(tmp_path), progress=False)
  msg = str(e.value)
  assert "non-finite values at step 1" in msg and "batch 0 of" in msg, msg
  assert "first non-finite metric: train/grad_norm = nan" in msg, msg
  assert "first MoE layer with a non-finite metric: none" in msg, msg
  assert "there is no checkpoint yet" in msg, msg
  assert not [n for n in os.listdir(tmp_path / "checkpoints") if n.isdigit()]


def test_skip_drops_exactly_the_bad_updates_and_halts_past_the_limit(tmp_path, monkeypatch):
  config = tiny_config(**{"train.nan_policy": "skip", "train.max_skipped_steps": 2,
                          "train.steps": 10, "train.checkpoint_every": 2,
                          "train.keep_checkpoints": 10, "train.eval_every": 100})
  # Steps 3, 4 skipped (2 in a row: allowed), 5 trains, 6, 7 skipped, 8 is a third in a row.
  monkeypatch.setattr(moejax.train, "Trainer", _poisoning_trainer([3, 4, 6, 7, 8]))
  workdir = str(tmp_path)
  with pytest.raises(faults.NonFiniteError) as e:
    train_and_evaluate(config, workdir, progress=False)
  msg = str(e.value)
  assert "3 non-finite steps in a row up to step 8" in msg, msg
  assert "more than train.max_skipped_steps=2" in msg and "was step 3" in msg, msg
  assert "layer_1" in msg and "latest checkpoint is step 6" in msg, msg
  assert _steps(workdir) == [2, 4, 6]

  trainer = Trainer(config)
  with checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), keep=10, every=2) as ckpt:
    states = {s: jax.device_get(ckpt.restore(s, abstract_state=trainer.abstract_state())[1])
              for s in (2, 4, 6)}
  same = lambda a, b: all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a),
                                                               jax.tree.leaves(b)))
  # The updates of steps 3 and 4 were dropped: params and optimizer state are those of step 2.
  assert same(states[4]["params"], states[2]["params"])
  assert same(states[4]["opt_state"], states[2]["opt_state"])
  assert int(states[4]["step"]) == 4   # the batches were used up: the data order is kept
  assert not same(states[6]["params"], states[4]["params"])   # step 5 trained
  rows = {r["step"]: r for r in read_metrics(workdir) if "train/loss" in r}
  assert [rows[s]["train/skipped_steps"] for s in range(1, 8)] == [0, 0, 1, 2, 2, 3, 4]
  assert all(np.isfinite(rows[s]["train/loss"]) for s in (1, 2, 5))
  assert all(np.isnan(rows[s]["train/loss"]) for s in (3, 4, 6, 7))
