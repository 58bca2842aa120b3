"""Tests for moejax.checkpoint: round trips onto new shardings, retention, save interval,
interrupted saves (a real SIGKILL mid-save and orbax's leftover layout) and SIGTERM handling.

References are independent of the code under test: numpy copies taken before saving, the
step directories on disk (`os.listdir`), and the outputs of child processes.
"""

import os
import signal
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from moejax.checkpoint import Checkpointer, PreemptionGuard

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TMP_SUFFIX = ".orbax-checkpoint-tmp"


def _abstract(tree, sharding_fn):
  """ShapeDtypeStructs of `tree` with sharding_fn(path, leaf) as the sharding."""
  return jax.tree_util.tree_map_with_path(
      lambda p, x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding_fn(p, x)), tree
  )


def _steps_on_disk(directory):
  return sorted(int(n) for n in os.listdir(directory) if n.isdigit())


def _child(script, tmp_path):
  """Starts `script` in a fresh CPU-only Python, stdout piped, with moejax importable."""
  path = tmp_path / "child.py"
  path.write_text(textwrap.dedent(script))
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO, XLA_FLAGS="")
  return subprocess.Popen(
      [sys.executable, str(path)],
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
      env=env,
  )


def _read_until(proc, prefix):
  """Reads the child's stdout up to a line starting with `prefix`."""
  for line in proc.stdout:
    if line.startswith(prefix):
      return line
  proc.wait()
  raise AssertionError(
      f"child exited {proc.returncode} before {prefix!r}: " f"{proc.stderr.read()[-3000:]}"
  )


def test_round_trip_mixed_dtypes_key_and_new_sharding(tmp_path):
  mesh8 = jax.make_mesh((8,), ("x",))
  w = np.arange(32, dtype=np.float32).reshape(8, 4) / 7
  state = {
      "w": jax.device_put(w, NamedSharding(mesh8, P("x", None))),
      "b": jnp.linspace(-2, 2, 24, dtype=jnp.bfloat16).reshape(4, 6),
      "count": jnp.int32(12345),
      "mask": jnp.array([0, 1, 255], jnp.uint8),
      "key": jax.random.key(7),
      "keys": jax.random.split(jax.random.key(3), 4),
  }
  expected = {
      k: np.asarray(jax.random.key_data(v) if k.startswith("key") else v) for k, v in state.items()
  }
  draws = np.asarray(jax.random.normal(state["key"], (5,)))
  extra = {"data": {"epoch": 2, "offset": 17}, "config": {"lr": 3e-4, "name": "default"}}

  ckpt = Checkpointer(tmp_path / "ckpt", keep=3, every=1)
  assert ckpt.save(10, state, extra)
  ckpt.close()

  # A fresh Checkpointer (as after a restart), restoring onto another mesh and specs.
  mesh24 = jax.make_mesh((2, 4), ("a", "b"))
  specs = {"w": P("b", "a"), "b": P("a", None), "keys": P("b")}
  abstract = _abstract(state, lambda p, x: NamedSharding(mesh24, specs.get(p[0].key, P())))
  ckpt = Checkpointer(tmp_path / "ckpt", keep=3, every=1)
  step, restored, restored_extra = ckpt.restore(abstract_state=abstract)
  ckpt.close()

  assert step == 10 and restored_extra == extra
  for k, v in restored.items():
    assert v.dtype == state[k].dtype, k
    assert v.sharding == abstract[k].sharding, k
    got = np.asarray(jax.random.key_data(v) if k.startswith("key") else v)
    np.testing.assert_array_equal(got, expected[k], err_msg=k)
  assert jax.random.key_impl(restored["key"]) == jax.random.key_impl(state["key"])
  np.testing.assert_array_equal(np.asarray(jax.random.normal(restored["key"], (5,))), draws)

  # And onto a one-device mesh.
  mesh1 = jax.make_mesh((1,), ("x",), devices=jax.devices()[:1])
  abstract1 = _abstract(state, lambda p, x: NamedSharding(mesh1, P()))
  _, restored1, _ = Checkpointer(tmp_path / "ckpt", keep=3, every=1).restore(
      10, abstract_state=abstract1
  )
  np.testing.assert_array_equal(np.asarray(restored1["w"]), w)
  assert restored1["w"].sharding == abstract1["w"].sharding


def test_round_trip_nnx_and_optax_state(tmp_path):
  model = nnx.Linear(4, 8, rngs=nnx.Rngs(0))
  params = nnx.state(model, nnx.Param)
  tx = optax.adamw(1e-2)
  opt_state = tx.init(params)
  grads = jax.tree.map(jnp.ones_like, params)
  _, opt_state = tx.update(grads, opt_state, params)  # non-trivial mu, nu and count
  state = {"params": params, "opt": opt_state, "rngs": nnx.state(nnx.Rngs(dropout=5))}
  leaves = [
      np.asarray(jax.random.key_data(x) if jnp.issubdtype(x.dtype, jax.dtypes.prng_key) else x)
      for x in jax.tree.leaves(state)
  ]

  with Checkpointer(tmp_path, keep=1, every=5) as ckpt:
    ckpt.save(5, state, {})
    mesh = jax.make_mesh((8,), ("x",))
    abstract = _abstract(
        jax.eval_shape(lambda: state),
        lambda p, x: NamedSharding(
            mesh, P(*[None] * (x.ndim - 1), "x") if x.shape[-1:] == (8,) else P()
        ),
    )
    _, restored, _ = ckpt.restore(abstract_state=abstract)

  assert jax.tree.structure(restored) == jax.tree.structure(state)
  got = [
      np.asarray(jax.random.key_data(x) if jnp.issubdtype(x.dtype, jax.dtypes.prng_key) else x)
      for x in jax.tree.leaves(restored)
  ]
  for g, e in zip(got, leaves, strict=True):
    np.testing.assert_array_equal(g, e)


def test_keeps_last_k(tmp_path):
  with Checkpointer(tmp_path, keep=2, every=1) as ckpt:
    for step in range(1, 6):
      assert ckpt.save(step, {"x": jnp.full((3,), step)}, {"step": step})
    ckpt.wait()
    assert ckpt.all_steps() == [4, 5]
  assert _steps_on_disk(tmp_path) == [4, 5]
  assert Checkpointer(tmp_path, keep=2, every=1).latest_step() == 5


def test_save_interval_and_force(tmp_path):
  with Checkpointer(tmp_path, keep=10, every=3) as ckpt:
    assert ckpt.latest_step() is None
    saved = [s for s in range(1, 11) if ckpt.save(s, {"x": jnp.int32(s)}, {})]
    assert saved == [3, 6, 9]  # orbax alone would also save step 1 (its InitialSavePolicy)
    assert ckpt.save(10, {"x": jnp.int32(10)}, {}, force=True)
    assert not ckpt.save(10, {"x": jnp.int32(10)}, {}, force=True)  # already saved
  assert _steps_on_disk(tmp_path) == [3, 6, 9, 10]

  with Checkpointer(tmp_path / "forced_only", keep=10, every=0) as ckpt:
    assert [s for s in range(1, 6) if ckpt.save(s, {"x": jnp.int32(s)}, {})] == []
    assert ckpt.save(5, {"x": jnp.int32(5)}, {}, force=True)
    assert ckpt.all_steps() == [5]


def test_errors_name_field_value_and_allowed(tmp_path):
  with pytest.raises(ValueError, match=r"keep=0: allowed is an int >= 1"):
    Checkpointer(tmp_path, keep=0, every=1)
  with pytest.raises(ValueError, match=r"every=-1: allowed"):
    Checkpointer(tmp_path, keep=1, every=-1)
  with Checkpointer(tmp_path, keep=2, every=1) as ckpt:
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
      ckpt.restore(abstract_state={})
    with pytest.raises(ValueError, match=r"extra=.*JSON-serialisable"):
      ckpt.save(1, {"x": jnp.ones(2)}, {"pos": np.int64(3)})
    ckpt.save(4, {"x": jnp.ones(2)}, {})
    with pytest.raises(ValueError, match=r"step=2: allowed are steps > the latest saved step 4"):
      ckpt.save(2, {"x": jnp.ones(2)}, {})
    with pytest.raises(FileNotFoundError, match=r"step=3: allowed are .*\[4\]"):
      ckpt.restore(3, abstract_state={"x": jax.ShapeDtypeStruct((2,), jnp.float32)})
    with pytest.raises(ValueError, match=r"abstract_state\['x'\].*with a sharding"):
      ckpt.restore(abstract_state={"x": jax.ShapeDtypeStruct((2,), jnp.float32)})


def test_killed_mid_save_is_not_taken_for_complete(tmp_path):
  directory = tmp_path / "ckpt"
  proc = _child(
      f"""
        import os, signal, numpy as np, jax, jax.numpy as jnp
        from moejax.checkpoint import Checkpointer
        ckpt = Checkpointer({str(directory)!r}, keep=5, every=1)
        ckpt.save(1, {{"w": jnp.arange(8.0)}}, {{"step": 1}})
        ckpt.wait()
        # 64 MiB of incompressible floats: the background write takes ~0.1 s after save()
        # returns; the process kills itself at once, well inside that window.
        big = np.random.default_rng(0).standard_normal((16, 1024, 1024), dtype=np.float32)
        ckpt.save(2, {{"w": jnp.asarray(big)}}, {{"step": 2}})
        os.kill(os.getpid(), signal.SIGKILL)
    """,
      tmp_path,
  )
  _, err = proc.communicate(timeout=120)
  assert proc.returncode == -signal.SIGKILL, err[-3000:]
  names = os.listdir(directory)
  assert any(
      n.startswith("2" + TMP_SUFFIX) for n in names
  ), f"the kill came after the save finished ({names}); the test did not interrupt a save"
  assert "2" not in names

  ckpt = Checkpointer(directory, keep=5, every=1)
  assert ckpt.latest_step() == 1
  abstract = {
      "w": jax.ShapeDtypeStruct(
          (8,), jnp.float32, sharding=jax.sharding.SingleDeviceSharding(jax.devices()[0])
      )
  }
  step, state, extra = ckpt.restore(abstract_state=abstract)
  assert step == 1 and extra == {"step": 1}
  np.testing.assert_array_equal(np.asarray(state["w"]), np.arange(8.0))
  # The same step can be saved again: the leftover tmp directory is gone.
  assert ckpt.save(2, {"w": jnp.ones(8)}, {"step": 2})
  ckpt.close()
  assert sorted(os.listdir(directory)) == ["1", "2"]


def test_unfinalised_tmp_dir_as_orbax_leaves_it(tmp_path):
  """Orbax writes everything, commit_success.txt included, then renames <step>.tmp to <step>;
  a kill just before the rename leaves this exact layout."""
  with Checkpointer(tmp_path, keep=5, every=1) as ckpt:
    ckpt.save(1, {"w": jnp.full((4,), 1.0)}, {"step": 1})
    ckpt.save(2, {"w": jnp.full((4,), 2.0)}, {"step": 2})
  os.rename(tmp_path / "2", tmp_path / ("2" + TMP_SUFFIX))
  assert "commit_success.txt" in os.listdir(tmp_path / ("2" + TMP_SUFFIX))

  ckpt = Checkpointer(tmp_path, keep=5, every=1)
  assert ckpt.latest_step() == 1 and ckpt.all_steps() == [1]
  abstract = {
      "w": jax.ShapeDtypeStruct(
          (4,),
          jnp.float32,
          sharding=NamedSharding(jax.make_mesh((4,), ("x",), devices=jax.devices()[:4]), P("x")),
      )
  }
  step, state, extra = ckpt.restore(abstract_state=abstract)
  assert step == 1 and extra == {"step": 1}
  np.testing.assert_array_equal(np.asarray(state["w"]), np.full((4,), 1.0))
  ckpt.close()
  assert sorted(os.listdir(tmp_path)) == ["1"]  # opening the directory deleted the leftover


def test_sigterm_saves_at_the_step_it_stopped_and_exits_zero(tmp_path):
  directory = tmp_path / "ckpt"
  proc = _child(
      f"""
        import time, jax.numpy as jnp
        from moejax.checkpoint import Checkpointer, PreemptionGuard
        ckpt = Checkpointer({str(directory)!r}, keep=2, every=1000)
        state = {{"x": jnp.zeros((4,), jnp.int32)}}
        with PreemptionGuard() as guard:
            for step in range(1, 100_000):
                state = {{"x": state["x"] + 1}}
                print("STEP", step, flush=True)
                time.sleep(0.01)
                if guard.should_stop:
                    ckpt.save(step, state, {{"data_pos": step}}, force=True)
                    print("STOPPED", step, flush=True)
                    break
        ckpt.close()
    """,
      tmp_path,
  )
  _read_until(proc, "STEP 5")
  proc.send_signal(signal.SIGTERM)
  out, err = proc.communicate(timeout=60)
  assert proc.returncode == 0, err[-3000:]
  stopped = [int(ln.split()[1]) for ln in out.splitlines() if ln.startswith("STOPPED")]
  assert len(stopped) == 1 and stopped[0] >= 5
  n = stopped[0]

  ckpt = Checkpointer(directory, keep=2, every=1000)
  assert ckpt.all_steps() == [n]
  sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  step, state, extra = ckpt.restore(
      abstract_state={"x": jax.ShapeDtypeStruct((4,), jnp.int32, sharding=sharding)}
  )
  assert step == n and extra == {"data_pos": n}
  np.testing.assert_array_equal(np.asarray(state["x"]), np.full((4,), n))
  ckpt.close()


def test_preemption_guard_sets_flag_and_restores_handler():
  calls = []
  previous_int = signal.getsignal(signal.SIGINT)
  previous = signal.signal(signal.SIGTERM, lambda s, f: calls.append(s))
  try:
    with PreemptionGuard(sigint=True) as guard:
      assert not guard.should_stop
      os.kill(os.getpid(), signal.SIGTERM)
      assert guard.should_stop and guard.signal_received == signal.SIGTERM
      with pytest.raises(KeyboardInterrupt):  # a second Ctrl-C still interrupts
        os.kill(os.getpid(), signal.SIGINT)
    assert calls == []
    assert signal.getsignal(signal.SIGINT) is previous_int
    os.kill(os.getpid(), signal.SIGTERM)
    assert calls == [signal.SIGTERM]
  finally:
    signal.signal(signal.SIGTERM, previous)
