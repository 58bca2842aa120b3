"""Tests of moejax.data against independent references.

References: dense transition matrices built here from the sparse tables; empirical entropies
and frequencies from sampled sequences (tolerances from their standard errors); brute-force
joint probabilities for the Bayes-optimal loss; bytes re-read from the files for text packing.
"""
import json
import math
import os

import numpy as np
import pytest

from moejax import data
from moejax.data.synthetic import MarkovMixture

from helpers import load_config

def _config(**overrides):
  """configs/default.py with dotted-name overrides, e.g. _config(**{'data.source': 'text'});
  text sources get the byte vocabulary (256) unless the overrides say otherwise."""
  if overrides.get("data.source") == "text":
    overrides = {"model.vocab_size": 256, **overrides}
  return load_config(**overrides)


def _dense(language):
  """P [M, V, V] from the sparse successor tables, by a plain loop (the test's own build)."""
  m, v, b = language.successors.shape
  p = np.zeros((m, v, v))
  for d in range(m):
    for s in range(v):
      for k in range(b):
        p[d, s, language.successors[d, s, k]] += language.probs[d, s, k]
  return p


def _bfs_levels(edges, n):
  """Breadth-first distance from state 0 along `edges` (-1: unreachable)."""
  out = [[] for _ in range(n)]
  for u, v in edges:
    out[u].append(v)
  level, frontier = [-1] * n, [0]
  level[0] = 0
  while frontier:
    nxt = []
    for u in frontier:
      for v in out[u]:
        if level[v] < 0:
          level[v] = level[u] + 1
          nxt.append(v)
    frontier = nxt
  return level


@pytest.fixture(scope="module")
def default_language():
  return MarkovMixture(vocab_size=256, num_domains=8, branching=4, seed=0)


# ----------------------------------------------------------------------------- synthetic


def test_synthetic_batch_contract():
  config = _config()
  source = data.make_source(config, "train")
  batch = source.next()
  b, s = config.train.batch_size, config.train.seq_len
  assert set(batch) == {"inputs", "targets", "segment_ids", "positions", "domain"}
  for key in ("inputs", "targets", "segment_ids", "positions"):
    assert batch[key].shape == (b, s) and batch[key].dtype == np.int32, key
  assert batch["domain"].shape == (b,) and batch["domain"].dtype == np.int32
  np.testing.assert_array_equal(batch["targets"][:, :-1], batch["inputs"][:, 1:])
  np.testing.assert_array_equal(batch["segment_ids"], 1)
  np.testing.assert_array_equal(batch["positions"], np.broadcast_to(np.arange(s), (b, s)))
  assert batch["inputs"].min() >= 0 and batch["inputs"].max() < config.model.vocab_size
  assert 0 <= batch["domain"].min() and batch["domain"].max() < config.data.num_domains
  assert isinstance(source.loss_floor, float) and 0 < source.loss_floor < math.log(4)
  assert json.loads(json.dumps(source.get_state())) == {"index": 1}


def test_chains_are_sparse_irreducible_and_aperiodic(default_language):
  lang = default_language
  succ, probs = lang.successors, lang.probs
  assert succ.shape == probs.shape == (8, 256, 4)
  # b distinct successors per state, positive probabilities summing to one.
  assert (np.sort(succ, axis=-1)[..., 1:] != np.sort(succ, axis=-1)[..., :-1]).all()
  assert (probs > 0).all()
  np.testing.assert_allclose(probs.sum(-1), 1.0, atol=1e-12)
  # Irreducible: every state reaches and is reached from state 0. Aperiodic: the period,
  # gcd over edges u -> v of level(u) + 1 - level(v) with BFS levels from 0, is 1.
  for d in range(lang.num_domains):
    edges = [(u, int(v)) for u in range(lang.vocab_size) for v in succ[d, u]]
    level = _bfs_levels(edges, lang.vocab_size)
    back = _bfs_levels([(v, u) for u, v in edges], lang.vocab_size)
    assert min(level) >= 0 and min(back) >= 0, d
    period = 0
    for u, v in edges:
      period = math.gcd(period, level[u] + 1 - level[v])
    assert period == 1, d
  # The domains really differ (otherwise the mixture is one chain).
  assert len({succ[d].tobytes() for d in range(8)}) == 8


def test_stationary_distribution_is_stationary_and_matches_samples(default_language):
  lang = default_language
  pi = lang.stationary
  p = _dense(lang)
  np.testing.assert_allclose(np.einsum("ds,dst->dt", pi, p), pi, rtol=0, atol=1e-13)
  np.testing.assert_allclose(pi.sum(-1), 1.0, atol=1e-12)
  assert (pi > 0).all()
  # Unique as well, as the chains are irreducible (test above).
  # Empirical frequencies of the first and of a later token, per domain (independent across
  # sequences): within 5 binomial standard deviations (+ 1/n for near-empty cells).
  tokens, domain = lang.sample(np.random.default_rng(123), 160_000, 17)
  for column in (0, 16):
    for d in range(lang.num_domains):
      x = tokens[domain == d, column]
      n = len(x)
      freq = np.bincount(x, minlength=lang.vocab_size) / n
      tol = 5 * np.sqrt(pi[d] * (1 - pi[d]) / n) + 1 / n
      assert (np.abs(freq - pi[d]) <= tol).all(), (column, d)


def _empirical_conditional_entropy(lang, rng, batch, length):
  """Miller-Madow-corrected plug-in H(X_{t+1} | X_t, domain) from samples, and its std error."""
  v = lang.vocab_size
  tokens, domain = lang.sample(rng, batch, length)
  ctx = (np.broadcast_to(domain[:, None], (batch, length - 1)) * v + tokens[:, :-1]).ravel()
  nxt = tokens[:, 1:].ravel()
  counts = np.bincount(ctx * v + nxt, minlength=lang.num_domains * v * v).reshape(-1, v)
  n = counts.sum()
  ctx_counts = counts.sum(axis=1, keepdims=True)
  with np.errstate(divide="ignore", invalid="ignore"):
    log_q = np.where(counts > 0, np.log(counts / ctx_counts), 0.0)
  plug_in = -(counts * log_q).sum() / n
  miller_madow = np.maximum((counts > 0).sum(axis=1) - 1, 0).sum() / (2 * n)
  per_token = -log_q[ctx, nxt]
  return plug_in + miller_madow, per_token.std() / np.sqrt(n)


@pytest.mark.parametrize("vocab,domains,branching,seed,alpha", [
    (256, 8, 4, 0, 1.0),   # the default language
    (32, 4, 4, 0, 0.3),    # skewed: pi far from uniform, so the pi-weighting matters
])
def test_loss_floor_matches_empirical_conditional_entropy(vocab, domains, branching, seed, alpha):
  lang = MarkovMixture(vocab, domains, branching, seed, alpha=alpha)
  estimate, stderr = _empirical_conditional_entropy(lang, np.random.default_rng(7), 8192, 129)
  # ~1M transitions: stderr ~ 6e-4; the Miller-Madow remainder is O(contexts / n^2).
  tol = 5 * stderr + 1e-4
  assert abs(lang.entropy_rate - estimate) < tol, (lang.entropy_rate, estimate, tol)
  if alpha < 1:
    # The test can fail: weighting states uniformly instead of by pi is detectably wrong.
    row_entropy = -(lang.probs * np.log(lang.probs)).sum(-1)
    assert abs(row_entropy.mean() - estimate) > 10 * tol


def test_bayes_nll_equals_brute_force_joint_probabilities():
  lang = MarkovMixture(vocab_size=6, num_domains=3, branching=2, seed=3)
  p = _dense(lang)
  tokens, _ = lang.sample(np.random.default_rng(0), 20, 8)
  got = lang.bayes_nll(tokens)
  assert got.shape == (20, 7)
  for i, x in enumerate(tokens):
    joint = [sum(lang.prior[d] * lang.stationary[d, x[0]] *
                 np.prod([p[d, x[j - 1], x[j]] for j in range(1, t + 1)])
                 for d in range(3)) for t in range(8)]
    want = [-math.log(joint[t] / joint[t - 1]) for t in range(1, 8)]
    np.testing.assert_allclose(got[i], want, rtol=1e-10)
  # A sequence impossible under every domain costs infinitely much at the impossible step.
  s = lang.successors
  bad_next = next(y for y in range(6) if all(y not in s[d, 0] for d in range(3)))
  nll = lang.bayes_nll(np.array([[0, bad_next]]))
  assert np.isinf(nll[0, 0])


def test_bayes_loss_is_above_floor_and_approaches_it(default_language):
  lang = default_language
  tokens, _ = lang.sample(np.random.default_rng(5), 128, 1025)
  nll = lang.bayes_nll(tokens)
  floor = lang.entropy_rate
  late = nll[:, 512:]
  stderr = late.std() / np.sqrt(late.size)
  assert nll.mean() > floor
  assert nll[:, 0].mean() > floor + 1.0          # the first target: domain still unknown
  assert abs(late.mean() - floor) < 5 * stderr + 0.005, (late.mean(), floor, stderr)
  # Through the source, on its own batches.
  source = data.make_source(_config(), "eval")
  batch = source.next()
  assert source.bayes_nll(batch).shape == batch["targets"].shape


def test_synthetic_determinism_and_disjoint_splits():
  config = _config()
  a, b = data.make_source(config, "train"), data.make_source(config, "train")
  for _ in range(3):
    x, y = a.next(), b.next()
    for key in x:
      np.testing.assert_array_equal(x[key], y[key])
  train = data.make_source(config, "train")
  eval_ = data.make_source(config, "eval")
  train_rows = {r.tobytes() for _ in range(4) for r in train.next()["inputs"]}
  eval_rows = {r.tobytes() for _ in range(4) for r in eval_.next()["inputs"]}
  assert not train_rows & eval_rows
  # The same language in both splits; another data seed gives another language.
  assert train.loss_floor == eval_.loss_floor
  other = data.make_source(_config(**{"data.seed": 1}), "train")
  assert other.loss_floor != train.loss_floor
  # data.seed falls back to config.seed.
  if "seed" not in config.data:
    assert data.make_source(_config(seed=1), "train").loss_floor == other.loss_floor


# ----------------------------------------------------------------------------- resume


def _check_resume(config):
  straight = data.make_source(config, "train")
  for _ in range(3):
    straight.next()
  state = json.loads(json.dumps(straight.get_state()))
  want = [straight.next() for _ in range(3)]
  resumed = data.make_source(config, "train")
  resumed.set_state(state)
  for w in want:
    got = resumed.next()
    assert set(got) == set(w)
    for key in w:
      np.testing.assert_array_equal(got[key], w[key])


def test_resume_synthetic():
  _check_resume(_config())


def test_resume_text(tmp_path):
  for i in range(3):
    (tmp_path / f"doc{i}.txt").write_bytes(os.urandom(50 + 17 * i))
  _check_resume(_config(**{"data.source": "text", "data.text_glob": str(tmp_path / "*.txt"),
                           "train.batch_size": 2, "train.seq_len": 16}))


# ----------------------------------------------------------------------------- text


def _text_config(pattern, batch_size=2, seq_len=7, **extra):
  return _config(**{"data.source": "text", "data.text_glob": pattern,
                    "train.batch_size": batch_size, "train.seq_len": seq_len, **extra})


def test_text_packs_bytes_exactly(tmp_path):
  contents = [b"Hello, world!\n", b"The quick brown fox jumps over the lazy dog.\n",
              bytes(range(256)) * 2, b"xy"]
  for i, c in enumerate(contents):
    (tmp_path / f"{i}.txt").write_bytes(c)
  eval_fraction = 0.25
  config = _text_config(str(tmp_path / "*.txt"), **{"data.eval_fraction": eval_fraction})
  b, s = config.train.batch_size, config.train.seq_len
  train = data.make_source(config, "train")
  assert train.loss_floor is None

  # The documents: the bytes before each file's cut, re-read here; 'xy' keeps 1 byte -> dropped.
  cut = [int(np.floor((1 - eval_fraction) * len(c))) for c in contents]
  docs = [c[:k] for c, k in zip(contents, cut) if k >= 2]
  assert [d.tobytes() for d in train.documents] == docs

  # Expected endless stream of (input, target, document key) over three epochs.
  pairs = []
  for epoch in range(3):
    order = train.epoch_order(epoch)
    assert sorted(order) == list(range(len(docs)))
    for k in order:
      pairs += [(docs[k][t], docs[k][t + 1], (epoch, k)) for t in range(len(docs[k]) - 1)]
  num_batches = len(pairs) // (b * s)
  got = [train.next() for _ in range(num_batches)]
  for i, batch in enumerate(got):
    assert set(batch) == {"inputs", "targets", "segment_ids", "positions"}
    for row in range(b):
      chunk = pairs[(i * b + row) * s:(i * b + row + 1) * s]
      assert batch["inputs"][row].tolist() == [p[0] for p in chunk]
      assert batch["targets"][row].tolist() == [p[1] for p in chunk]
      segment, position, seg_ids, positions = 0, 0, [], []
      for col, p in enumerate(chunk):
        if col == 0 or p[2] != chunk[col - 1][2]:
          segment, position = segment + 1, 0
        seg_ids.append(segment)
        positions.append(position)
        position += 1
      assert batch["segment_ids"][row].tolist() == seg_ids
      assert batch["positions"][row].tolist() == positions
      assert batch["inputs"][row].dtype == np.int32

  # Reconstruct epoch 0's documents from the batches alone: within a document targets[t] ==
  # inputs[t+1]; a document = its inputs + its last target.
  flat_in = np.concatenate([x["inputs"].ravel() for x in got])
  flat_tg = np.concatenate([x["targets"].ravel() for x in got])
  offset = 0
  for k in train.epoch_order(0):
    n = len(docs[k]) - 1
    rebuilt = bytes(flat_in[offset:offset + n].astype(np.uint8)) + bytes([flat_tg[offset + n - 1]])
    assert rebuilt == docs[k]
    offset += n


def test_text_splits_are_disjoint_and_cover_the_file(tmp_path):
  text = bytes(np.random.default_rng(0).integers(0, 256, 1000, dtype=np.uint8))
  (tmp_path / "a.txt").write_bytes(text)
  config = _text_config(str(tmp_path / "a.txt"), batch_size=16, seq_len=64)
  train, eval_ = data.make_source(config, "train"), data.make_source(config, "eval")
  (tr,), (ev,) = train.documents, eval_.documents
  assert tr.tobytes() + ev.tobytes() == text
  assert len(ev) == 100                      # data.eval_fraction defaults to 0.1
  # A single document: the stream is the file's train part, epoch after epoch.
  batch = train.next()
  flat = batch["inputs"].ravel()
  n = len(tr) - 1
  np.testing.assert_array_equal(flat[:n], tr[:-1])
  np.testing.assert_array_equal(flat[n:], tr[:len(flat) - n])
  # Segment 2 starts in the row where the epoch wraps, at the right position.
  row, col = divmod(n, 64)
  assert batch["segment_ids"][row, col] == 2 and batch["positions"][row, col] == 0
  assert batch["positions"][row, col - 1] == col - 1


def test_text_order_depends_on_seed_and_split(tmp_path):
  for i in range(6):
    (tmp_path / f"{i}.txt").write_bytes(bytes([65 + i]) * 40)
  pattern = str(tmp_path / "*.txt")
  orders = {seed: data.make_source(_text_config(pattern, **{"data.seed": seed}), "train")
            .epoch_order(0).tolist() for seed in range(4)}
  assert len({tuple(o) for o in orders.values()}) > 1
  same = data.make_source(_text_config(pattern, **{"data.seed": 0}), "train")
  assert same.epoch_order(0).tolist() == orders[0]
  a = data.make_source(_text_config(pattern), "train").next()
  b = data.make_source(_text_config(pattern), "train").next()
  np.testing.assert_array_equal(a["inputs"], b["inputs"])


# ----------------------------------------------------------------------------- errors


def _raises(config, split, *fragments):
  with pytest.raises(ValueError) as err:
    data.make_source(config, split)
  for f in fragments:
    assert f in str(err.value), (f, str(err.value))


def test_errors_name_the_field(tmp_path):
  (tmp_path / "a.txt").write_bytes(b"some text here")
  ok_glob = str(tmp_path / "*.txt")
  _raises(_config(**{"data.source": "tfrecord"}), "train",
          "data.source", "'tfrecord'", "synthetic", "text")
  _raises(_config(), "validation", "split", "'validation'", "train", "eval")
  _raises(_config(**{"data.source": "text"}), "train", "data.text_glob", "''")
  _raises(_text_config(str(tmp_path / "*.none")), "train", "data.text_glob", "*.none")
  _raises(_text_config(ok_glob, **{"model.vocab_size": 128}), "train",
          "model.vocab_size", "128", "256")
  _raises(_text_config(ok_glob, **{"data.eval_fraction": 1.5}), "train",
          "data.eval_fraction", "1.5")
  _raises(_text_config(ok_glob, **{"data.eval_fraction": 0.01}), "eval", "data.text_glob",
          "data.eval_fraction")
  _raises(_config(**{"data.branching": 1}), "train", "data.branching", "1", "[2, ")
  _raises(_config(**{"data.branching": 300}), "train", "data.branching", "300", "128")
  _raises(_config(**{"data.num_domains": 0}), "train", "data.num_domains", "0")
  _raises(_config(**{"train.batch_size": 0}), "train", "train.batch_size", "0")
  _raises(_config(**{"train.seq_len": -1}), "train", "train.seq_len", "-1")
  _raises(_config(**{"data.seed": -3}), "train", "data.seed", "-3")
  _raises(_config(**{"data.dirichlet_alpha": 0.0}), "train", "data.dirichlet_alpha")
  source = data.make_source(_config(), "train")
  with pytest.raises(ValueError, match="index"):
    source.set_state({"step": 3})
