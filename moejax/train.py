"""Training and evaluation: optimizer, pure jitted train/eval steps, and the loop.

One `train_and_evaluate(config, workdir)` in the shape of Flax's lm1b example: the steps are
pure functions over (params, optimizer state, batch) jitted with explicit shardings on the
mesh, so widening the mesh changes no code here.
"""
from __future__ import annotations

import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

from moejax import checkpoint, data, metrics as metrics_lib, sharding
from moejax.config import validate
from moejax.model import Transformer
from moejax.moe.routing import RouterState

BATCH_KEYS = ("inputs", "targets", "segment_ids", "positions")


def make_optimizer(t: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """AdamW ("Decoupled Weight Decay Regularization", Loshchilov & Hutter 2017, arXiv:1711.05101)
  with linear warmup and cosine decay to 10% (Chinchilla's schedule, arXiv:2203.15556), global-
  norm gradient clipping, and no decay on norm scales (1-D parameters)."""
  schedule = learning_rate_schedule(t)
  no_decay_on_vectors = lambda params: jax.tree.map(lambda p: p.ndim > 1, params)
  return optax.chain(
      optax.clip_by_global_norm(t.grad_clip),
      optax.adamw(schedule, b1=0.9, b2=0.95, weight_decay=t.weight_decay,
                  mask=no_decay_on_vectors))


def learning_rate_schedule(t: ml_collections.ConfigDict) -> optax.Schedule:
  """Linear warmup over `warmup_steps`, cosine decay to lr/10 at `steps`."""
  return optax.warmup_cosine_decay_schedule(0.0, t.lr, t.warmup_steps, max(t.steps, 1),
                                            end_value=t.lr * 0.1)


def lm_loss(logits: jax.Array, targets: jax.Array, weights: jax.Array):
  """Summed next-token cross-entropy and token count.

  Args:
    logits: [B, S, V] float32; targets: [B, S] int; weights: [B, S] (0 for padding).
  Returns:
    (sum of per-token losses, number of weighted tokens), both float32 scalars.
  """
  xent = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
  return jnp.sum(xent * weights), jnp.sum(weights)


def _forward_loss(graphdef, params, batch, *, train, rng):
  model = nnx.merge(graphdef, params)
  logits, aux = model(batch["inputs"], batch["positions"], batch["segment_ids"], train=train,
                      rng=rng)
  weights = (batch["segment_ids"] > 0).astype(jnp.float32)   # padding has segment 0
  loss_sum, count = lm_loss(logits, batch["targets"], weights)
  return loss_sum, count, aux


def _layer_scalars(aux) -> dict:
  """Flattens per-layer MoE metrics into `moe/<layer>/<metric>` names."""
  return {f"moe/{layer}/{name}": v for layer, ms in aux.layers.items() for name, v in ms.items()}


class Trainer:
  """Holds the mesh, the model definition, and the jitted train/eval steps for one config.

  The train state is a dict `{params, opt_state, step, rng}` of arrays (params as a pure dict
  of the NNX state); `init_state()` makes it sharded on the mesh, `train_step` and `eval_step`
  are `jax.jit`ted with explicit in/out shardings.
  """

  def __init__(self, config: ml_collections.ConfigDict, mesh=None):
    # Checked before anything is built: against all devices, or the mesh a caller passes.
    self.config = validate(config, num_devices=None if mesh is None else mesh.size)
    self.mesh = sharding.make_mesh(config.mesh) if mesh is None else mesh
    self.tx = make_optimizer(config.train)
    abstract = nnx.eval_shape(self._model)
    self.graphdef, abstract_state = nnx.split(abstract)
    self.param_shardings = nnx.to_pure_dict(sharding.state_shardings(abstract_state, self.mesh))
    # Router state (e.g. loss-free balancing biases) gets no gradient and no optimizer update;
    # the routers move it after each step (`_update_router_state`).
    self.router_state_mask = nnx.to_pure_dict(jax.tree.map(
        lambda v: isinstance(v, RouterState), abstract_state,
        is_leaf=lambda x: isinstance(x, nnx.Variable)))
    self.has_router_state = any(jax.tree.leaves(self.router_state_mask))
    self.batch_sharding = sharding.batch_sharding(self.mesh)
    self.replicated = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec())
    shardings = self.state_shardings = self._state_shardings()
    self._init = jax.jit(self._init_state, out_shardings=shardings)
    batch_shardings = {k: self.batch_sharding for k in BATCH_KEYS}
    self.train_step = jax.jit(self._train_step, in_shardings=(shardings, batch_shardings),
                              out_shardings=(shardings, self.replicated), donate_argnums=0)
    self.eval_step = jax.jit(self._eval_step,
                             in_shardings=(self.param_shardings, batch_shardings),
                             out_shardings=self.replicated)

  def _state_shardings(self):
    abstract = jax.eval_shape(self._init_state)
    # Optimizer moments mirror the params and take their shardings; counters are replicated.
    is_sharding = lambda x: isinstance(x, jax.sharding.Sharding)
    opt = optax.tree_utils.tree_map_params(
        self.tx, lambda _, s: s, abstract["opt_state"], self.param_shardings,
        transform_non_params=lambda _: self.replicated, is_leaf=is_sharding)
    return {"params": self.param_shardings, "opt_state": opt, "step": self.replicated,
            "rng": self.replicated}

  def _model(self) -> Transformer:
    return Transformer(self.config.model, rngs=nnx.Rngs(self.config.seed), mesh=self.mesh)

  def _init_state(self):
    model = self._model()
    params = nnx.to_pure_dict(nnx.state(model))
    return {"params": params, "opt_state": self.tx.init(params),
            "step": jnp.zeros((), jnp.int32),
            "rng": jax.random.key_data(jax.random.key(self.config.seed + 1))}

  def init_state(self):
    """A fresh train state, created directly in its shardings."""
    return self._init()

  def abstract_state(self):
    """Shapes, dtypes and shardings of the train state, without computing it (for restores)."""
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        jax.eval_shape(self._init_state), self.state_shardings)

  def _train_step(self, state, batch):
    rng = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), state["step"])

    def loss_fn(params):
      loss_sum, count, aux = _forward_loss(self.graphdef, params, batch, train=True, rng=rng)
      lm = loss_sum / jnp.maximum(count, 1.0)
      return lm + aux.aux_loss, (lm, aux)

    (_, (lm, aux)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
    if self.has_router_state:
      grads = jax.tree.map(lambda g, is_state: jnp.zeros_like(g) if is_state else g, grads,
                           self.router_state_mask)
    updates, opt_state = self.tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    if self.has_router_state:
      params = self._update_router_state(params, aux)
    out = {"train/loss": lm, "train/aux_loss": aux.aux_loss,
           "train/grad_norm": optax.tree.norm(grads),
           "train/lr": learning_rate_schedule(self.config.train)(state["step"]),
           **_layer_scalars(aux)}
    return {"params": params, "opt_state": opt_state, "step": state["step"] + 1,
            "rng": state["rng"]}, out

  def _update_router_state(self, params, aux):
    """Each MoE layer's router updates its `RouterState` from this step's global-batch metrics
    (e.g. loss-free balancing's bias, arXiv:2408.15664); the rest of `params` is unchanged."""
    model = nnx.merge(self.graphdef, params)
    for i, block in enumerate(model.blocks):
      if block.is_moe:
        block.ffn.update_state(aux.layers[f"layer_{i}"])
    return nnx.to_pure_dict(nnx.state(model))

  def _eval_step(self, params, batch):
    loss_sum, count, _ = _forward_loss(self.graphdef, params, batch, train=False, rng=None)
    return {"loss_sum": loss_sum, "count": count}

  def put_batch(self, batch: dict) -> dict:
    """Host numpy batch -> device arrays sharded over the data axes (model inputs only).

    On several processes `batch` may hold just this process's rows ([B/P, S] from a Grain
    source) or the whole global batch [B, S]; `jax.make_array_from_process_local_data` builds
    the global [B, S] arrays from either.
    """
    if jax.process_count() == 1:
      return {k: jax.device_put(np.asarray(batch[k]), self.batch_sharding) for k in BATCH_KEYS}
    shape = (self.config.train.batch_size, self.config.train.seq_len)
    return {k: jax.make_array_from_process_local_data(self.batch_sharding, np.asarray(batch[k]),
                                                      shape) for k in BATCH_KEYS}

  def evaluate(self, params, batches: list[dict]) -> dict:
    """Mean per-token loss over `batches` (device batches from `put_batch`)."""
    outs = jax.device_get([self.eval_step(params, b) for b in batches])
    return {"eval/loss": sum(float(o["loss_sum"]) for o in outs)
                         / max(sum(float(o["count"]) for o in outs), 1.0)}


def bayes_loss(source, batches: list[dict]) -> float | None:
  """Mean Bayes-optimal loss over host `batches` when `source` can compute it (the best any
  model can do at this sequence length; above `loss_floor`, which assumes the domain is known)."""
  if not hasattr(source, "bayes_nll"):
    return None
  return float(np.mean([source.bayes_nll(b).mean() for b in batches]))


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       progress: bool | None = None, stop_after: int | None = None,
                       sources: dict | None = None) -> dict[str, Any]:
  """Trains `config` in `workdir`, resuming from its latest complete checkpoint.

  Writes `workdir/config.json` (at the first start), `workdir/metrics.jsonl`, TensorBoard events in `workdir/tb` and orbax checkpoints in
  `workdir/checkpoints`. SIGTERM (a preemption) saves a checkpoint and returns early, as does
  reaching step `stop_after`; running again with the same workdir resumes exactly. `sources`
  ({split: source}, from `data.make_sources`) saves building the data again when the caller
  already did. Returns the run summary (see `metrics.format_summary`).

  Faults (moejax/faults.py): a NaN/Inf step raises `faults.NonFiniteError` or is skipped
  (`train.nan_policy`); on several processes a SIGTERM to any of them stops all after the same
  step (agreed every `train.preemption_check_every` steps), and a dead peer raises
  `faults.PeerLostError`; a failed save raises `checkpoint.CheckpointWriteError`.
  """
  from moejax import faults  # noqa: PLC0415  (fault handling, moejax/faults.py)
  validate(config)
  t = config.train
  # Host-side data first: a bad data field fails before anything is compiled.
  sources = data.make_sources(config) if sources is None else sources
  train_source, eval_source = sources["train"], sources["eval"]
  trainer = Trainer(config)
  ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), keep=t.keep_checkpoints,
                                 every=t.checkpoint_every)
  extra = {}
  if ckpt.latest_step() is None:
    start, state = 0, trainer.init_state()
  else:
    start, state, extra = ckpt.restore(abstract_state=trainer.abstract_state())
    train_source.set_state(extra["data"])
  # One writer of metrics and one progress bar per run: process 0 of a multi-host job.
  primary = _primary_process()
  if primary and start == 0:
    _write_config(config, workdir)
  writer = metrics_lib.MetricWriter(workdir, resume_step=start if start else None,
                                    primary=primary)
  # Every evaluation uses the same held-out batches, so eval losses compare across steps.
  host_eval_batches = [eval_source.next() for _ in range(t.eval_batches)]
  eval_batches = [trainer.put_batch(b) for b in host_eval_batches]
  floor = train_source.loss_floor
  data_stats = {"data/loss_floor": floor,
                "data/bayes_loss": bayes_loss(eval_source, host_eval_batches)}
  data_stats = {k: v for k, v in data_stats.items() if v is not None}
  if start == 0:
    writer.write(0, data_stats)
  tokens_per_step = t.batch_size * t.seq_len
  hide_bar = True if not primary else (None if progress is None else not progress)
  bar = metrics_lib.ProgressBar(t.steps, start, disable=hide_bar)
  last, tokens_per_s, eval_out = {}, None, {}
  tic, timed_steps = time.perf_counter(), 0
  # NaN/Inf policy and multi-host stop agreement: moejax/faults.py.
  step_fn = faults.guarded_step(trainer.train_step, skip=t.nan_policy == "skip")
  nan_state = extra.get("nan_guard", {})
  nan_guard = faults.init_guard(trainer.train_step, state, eval_batches[0],
                                skipped=nan_state.get("skipped", 0),
                                in_row=nan_state.get("in_row", 0))
  multi = jax.process_count() > 1
  step = start
  with checkpoint.PreemptionGuard() as guard, faults.peer_loss_as_error(ckpt, lambda: step):
    for step in range(start + 1, t.steps + 1):
      state, nan_guard, out = step_fn(state, nan_guard, trainer.put_batch(train_source.next()))
      timed_steps += 1
      # Several processes stop together: they agree every preemption_check_every steps.
      if not multi:
        stop = guard.should_stop
      else:
        stop = step % t.preemption_check_every == 0 and faults.any_process(guard.should_stop)
      stop = stop or step == stop_after
      force = stop or step == t.steps
      due = force or step % t.checkpoint_every == 0 or step % t.eval_every == 0
      if due or step % t.log_every == 0:
        # A sync point anyway: no later checkpoint, eval or log line once a step went bad.
        nan_host = jax.device_get(nan_guard)
        _halt_if_nonfinite(nan_host, t, ckpt, writer)
      if step % t.log_every == 0 or step == t.steps or stop:
        out = jax.device_get(out)
        elapsed = time.perf_counter() - tic
        tokens_per_s = timed_steps * tokens_per_step / max(elapsed, 1e-9)
        tic, timed_steps = time.perf_counter(), 0
        last = {**out, "train/tokens_per_s": tokens_per_s}
        writer.write(step, last)
        bar.update(step, loss=out["train/loss"], tokens_per_s=tokens_per_s,
                   max_vio=_layer_mean(out, "max_vio"))
      if step % t.eval_every == 0 or step == t.steps:
        eval_out = trainer.evaluate(state["params"], eval_batches)
        writer.write(step, eval_out)
        bar.write(f"step {step}: eval/loss {eval_out['eval/loss']:.4f}"
                  + (f" (floor {floor:.4f})" if floor is not None else ""))
        tic, timed_steps = time.perf_counter(), 0   # keep eval time out of tokens/s
      if force or step % t.checkpoint_every == 0:
        # Only when saving: a Grain source's get_state is a collective on several hosts.
        ckpt.save(step, state, {"data": train_source.get_state(),
                                "nan_guard": {"skipped": int(nan_host["skipped"]),
                                              "in_row": int(nan_host["in_row"])}}, force=force)
      if stop:
        break
  bar.close()
  if not eval_out:   # nothing left to train (a finished workdir) or stopped before an eval
    eval_out = trainer.evaluate(state["params"], eval_batches)
  ckpt.close()
  writer.close()
  final_step = int(jax.device_get(state["step"]))
  summary = {"step": final_step, "train/loss": last.get("train/loss"),
             "eval/loss": eval_out.get("eval/loss"), **data_stats,
             "train/tokens_per_s": tokens_per_s,
             "moe/max_vio": _layer_mean(last, "max_vio"),
             "moe/dropped_frac": _layer_mean(last, "dropped_frac"),
             "moe/load": _layer_mean(last, "load"),
             "checkpoints": ckpt.directory, "metrics": writer.path,
             "stopped_early": final_step < t.steps}
  return {k: v for k, v in summary.items() if v is not None}


def _halt_if_nonfinite(nan_host: dict, t, ckpt, writer) -> None:
  """Raises `faults.NonFiniteError` when `train.nan_policy` says the run must stop, after the
  checkpoint in flight (the last good one) is complete on disk."""
  from moejax import faults  # noqa: PLC0415
  report = faults.nonfinite_report(nan_host, policy=t.nan_policy,
                                   max_skipped_steps=t.max_skipped_steps)
  if report is None:
    return
  ckpt.close()
  writer.close()
  latest = ckpt.latest_step()
  raise faults.NonFiniteError(
      f"{report}. Nothing was saved after the bad step; "
      + (f"the latest checkpoint is step {latest} in {ckpt.directory} (a restart resumes from it)"
         if latest is not None else f"there is no checkpoint yet in {ckpt.directory}") + ".")


def _write_config(config: ml_collections.ConfigDict, workdir: str) -> None:
  """`workdir/config.json`: the config the run started with (what `moejax.plot` and readers of
  a workdir need), written whole or not at all."""
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, "config.json")
  with open(path + ".tmp", "w", encoding="utf-8") as f:
    f.write(config.to_json_best_effort(indent=1, sort_keys=True))
  os.replace(path + ".tmp", path)


def _primary_process() -> bool:
  """Whether this is process 0, the one that writes metrics and shows the progress bar."""
  return jax.process_index() == 0


def _layer_mean(out: dict, name: str):
  """Mean over MoE layers of metric `name` (an array for `load` [E], else a float); None if the
  model has no MoE layer."""
  vals = [np.asarray(v) for k, v in out.items() if k.startswith("moe/") and k.endswith("/" + name)]
  if not vals:
    return None
  mean = np.mean(vals, axis=0)
  return float(mean) if mean.ndim == 0 else mean
