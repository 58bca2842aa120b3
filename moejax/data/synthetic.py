"""Synthetic mixture-of-domains language: one sparse random Markov chain per latent domain.

Each of `num_domains` domains is a first-order Markov chain over one shared vocabulary of V
tokens. State s has `branching` successors: sigma(s) for one random V-cycle sigma (so the chain
is irreducible) and `branching - 1` other distinct random states; one random state per domain
also has a self-loop (so the chain is aperiodic). The successor probabilities are drawn from a
symmetric Dirichlet(alpha). An irreducible aperiodic finite chain has a unique stationary
distribution pi_d, and each sequence is: a domain d ~ uniform, x_0 ~ pi_d, x_t ~ P_d[x_{t-1}, :].

The loss floor is the entropy rate of this source per target token, sum_d p(d) H(X_1 | X_0, d)
(Cover & Thomas, Elements of Information Theory, 2nd ed., ch. 4, Thm 4.2.4): the cross-entropy
of a predictor that knows the domain. A model never sees the domain, so its best achievable
loss on finite sequences is the Bayes-optimal loss of `MarkovMixture.bayes_nll`, which is
>= the floor and tends to it as the posterior over domains concentrates.

Everything is a function of the data seed: the chains use the stream (seed, TAG_LANGUAGE) and
batch i of a split the stream (seed, TAG_BATCH, split, i).
"""
import numpy as np

from moejax.data import base


def _distinct_samples(rng: np.random.Generator, rows: int, n: int, k: int) -> np.ndarray:
  """k distinct uniform integers in [0, n) per row: Floyd's algorithm, vectorised over rows.

  Returns [rows, k] int64 (each row a uniformly random k-subset, in no particular order).
  """
  out = np.empty((rows, k), np.int64)
  for i, j in enumerate(range(n - k, n)):
    t = rng.integers(0, j + 1, size=rows)
    dup = (out[:, :i] == t[:, None]).any(axis=1)
    out[:, i] = np.where(dup, j, t)
  return out


def stationary_distribution(successors: np.ndarray, probs: np.ndarray,
                            tol: float = 1e-15, max_iters: int = 1_000_000) -> np.ndarray:
  """Stationary distributions pi [M, V] (pi_d P_d = pi_d, sum 1) of M irreducible chains.

  successors, probs: [M, V, b] (sparse rows of P_d). Power iteration on the lazy chain
  (I + P) / 2, which has the same stationary distribution and converges for any irreducible
  chain, from uniform until the L1 change of every pi_d is below `tol` (for the default
  language max |pi P - pi| is then ~1e-16). A sparse step costs O(M V b), so large vocabularies
  are cheap, where a dense solve would need M V^2 memory.
  """
  m, v, _ = successors.shape
  pi = np.full((m, v), 1.0 / v)
  flat_dst = (successors + np.arange(m)[:, None, None] * v).ravel()
  for _ in range(max_iters):
    moved = np.bincount(flat_dst, (pi[..., None] * probs).ravel(), minlength=m * v)
    new = 0.5 * (pi + moved.reshape(m, v))
    new /= new.sum(axis=1, keepdims=True)
    done = np.abs(new - pi).sum(axis=1).max() < tol
    pi = new
    if done:
      return pi
  raise RuntimeError(f"stationary distribution: no convergence in {max_iters} iterations")


class MarkovMixture:
  """A uniform mixture of `num_domains` sparse random Markov chains over `vocab_size` tokens.

  Attributes (float64 unless noted):
    successors: [M, V, b] int32, the b distinct successor states of each state of each domain.
    probs: [M, V, b], their transition probabilities (rows sum to 1, all > 0).
    stationary: [M, V], the stationary distribution pi_d of each domain.
    prior: [M], the (uniform) domain prior.
    entropy_rate: float, nats per token: sum_d p(d) sum_s pi_d(s) H(P_d[s, :])
      (Cover & Thomas, Elements of Information Theory, ch. 4).
  """

  def __init__(self, vocab_size: int, num_domains: int, branching: int, seed: int = 0,
               alpha: float = 1.0):
    v = base.positive_int(vocab_size, "model.vocab_size")
    m = base.positive_int(num_domains, "data.num_domains")
    if v < 2:
      raise ValueError(f"model.vocab_size: got {v}; allowed: >= 2 for data.source='synthetic'")
    if isinstance(branching, bool) or not isinstance(branching, (int, np.integer)) or not (
        2 <= branching <= v):
      raise ValueError(f"data.branching: got {branching!r}; allowed: an integer in "
                       f"[2, model.vocab_size={v}]")
    if not (isinstance(alpha, (int, float)) and alpha > 0):
      raise ValueError(f"data.dirichlet_alpha: got {alpha!r}; allowed: a number > 0")
    b = int(branching)
    self.vocab_size, self.num_domains, self.branching = v, m, b
    rng = base.make_rng(seed, base.TAG_LANGUAGE)

    successors = np.empty((m, v, b), np.int64)
    for d in range(m):
      order = rng.permutation(v)
      cycle_next = np.empty(v, np.int64)
      cycle_next[order] = np.roll(order, -1)       # sigma: one V-cycle -> irreducible
      others = _distinct_samples(rng, v, v - 1, b - 1)
      others += others >= cycle_next[:, None]      # distinct from sigma(s) as well
      successors[d] = np.concatenate([cycle_next[:, None], others], axis=1)
      loop = rng.integers(v)                       # one self-loop -> aperiodic
      if not (successors[d, loop] == loop).any():
        successors[d, loop, -1] = loop             # column 0 (sigma) is never `loop`: V >= 2
    probs = rng.dirichlet(np.full(b, float(alpha)), size=(m, v))
    probs = np.maximum(probs, 1e-300)              # keep every edge (irreducibility) in floats
    probs /= probs.sum(axis=-1, keepdims=True)

    self.successors = successors.astype(np.int32)
    self.probs = probs
    self.prior = np.full(m, 1.0 / m)
    self.stationary = stationary_distribution(self.successors, probs)
    row_entropy = -(probs * np.log(probs)).sum(axis=-1)                    # [M, V]
    self.entropy_rate = float((self.prior[:, None] * self.stationary * row_entropy).sum())

    # Inverse-CDF sampling tables, the last entry exactly 1 so u in [0, 1) never selects past
    # the end; flattened over (domain, state) rows so one step of `sample` is two gathers.
    cum_probs = np.cumsum(probs, axis=-1)
    cum_probs[..., -1] = 1.0
    self._cum_probs_rows = cum_probs.reshape(m * v, b)
    self._successor_rows = self.successors.reshape(m * v, b)
    # First tokens: one sorted array, domain d's CDF shifted by d, so a single searchsorted of
    # d + u samples pi_d for every row (O(B log(M V)) rather than O(B V)).
    cum_stationary = np.cumsum(self.stationary, axis=-1)
    cum_stationary[..., -1] = 1.0
    self._shifted_cum_stationary = (cum_stationary + np.arange(m)[:, None]).ravel()

  def sample(self, rng: np.random.Generator, batch_size: int,
             length: int) -> tuple[np.ndarray, np.ndarray]:
    """Draws sequences: returns tokens [B, L] int32 and their domains [B] int32.

    Domain ~ uniform, first token ~ pi_d, then the chain; vectorised over the batch (a loop over
    positions only).
    """
    domain = rng.integers(self.num_domains, size=batch_size)
    u = rng.random((batch_size, length))
    tokens = np.empty((batch_size, length), np.int32)
    if length == 0:
      return tokens, domain.astype(np.int32)
    first = np.searchsorted(self._shifted_cum_stationary, domain + u[:, 0], side="right")
    tokens[:, 0] = np.clip(first - domain * self.vocab_size, 0, self.vocab_size - 1)
    row_base = domain * self.vocab_size
    for t in range(1, length):
      rows = row_base + tokens[:, t - 1]
      j = (u[:, t:t + 1] >= self._cum_probs_rows[rows]).sum(axis=1)
      tokens[:, t] = self._successor_rows[rows, j]
    return tokens, domain.astype(np.int32)

  def transition_prob(self, prev: np.ndarray, nxt: np.ndarray) -> np.ndarray:
    """P_d[prev, nxt] for every domain d: prev, nxt [N] -> [N, M] (0 where no edge)."""
    match = self.successors[:, prev, :] == nxt[None, :, None]         # [M, N, b]
    return (self.probs[:, prev, :] * match).sum(axis=-1).T

  def bayes_nll(self, tokens: np.ndarray) -> np.ndarray:
    """Bayes-optimal next-token loss of a predictor that does not know the domain.

    tokens: [B, L] whole sequences (x_0 .. x_{L-1}). Returns [B, L-1] float64 nats,
    -log p(x_t | x_<t) for t = 1 .. L-1, with the predictive mixture
    p(x_t | x_<t) = sum_d p(d | x_<t) P_d[x_{t-1}, x_t] and the posterior
    p(d | x_<t) proportional to p(d) pi_d(x_0) prod_{0<i<t} P_d[x_{i-1}, x_i], updated one token
    at a time (the forward recursion). Its expectation is >= `entropy_rate` at every t
    (conditioning on the domain cannot increase entropy; Cover & Thomas ch. 2) and tends to it
    as t grows. For the default language and S = 128 its mean is ~1.096 vs a floor of 1.084.
    Infinite where a sequence is impossible under every domain.
    """
    tokens = np.asarray(tokens)
    b, length = tokens.shape
    out = np.empty((b, max(length - 1, 0)))
    with np.errstate(divide="ignore"):
      log_post = np.log(self.prior)[None, :] + np.log(self.stationary[:, tokens[:, 0]].T)
      for t in range(1, length):
        log_post = log_post - _logsumexp(log_post)[:, None]               # p(d | x_<t)
        log_p = np.log(self.transition_prob(tokens[:, t - 1], tokens[:, t]))   # [B, M]
        joint = log_post + log_p
        out[:, t - 1] = -_logsumexp(joint)
        log_post = joint
    return out


def _logsumexp(x: np.ndarray) -> np.ndarray:
  """log sum exp over the last axis of x [N, M] -> [N]; -inf where a row is all -inf."""
  peak = x.max(axis=-1)
  safe = np.where(np.isfinite(peak), peak, 0.0)
  with np.errstate(divide="ignore"):
    return safe + np.log(np.exp(x - safe[:, None]).sum(axis=-1))


class SyntheticSource(base.IndexedSource):
  """Batches from a `MarkovMixture`; batch i of `split` is drawn from the stream
  (seed, split, i), so train and eval never share a stream and any batch is reproducible.

  `next()` returns int32 arrays: inputs, targets, segment_ids (all 1), positions [B, S], and
  domain [B] (for analysis only: never give it to the model). Each row is one sequence of
  S + 1 tokens: inputs = seq[:, :-1], targets = seq[:, 1:].
  `loss_floor` is the language's entropy rate (nats per target token).
  """

  def __init__(self, language: MarkovMixture, batch_size: int, seq_len: int, *,
               seed: int = 0, split: str = "train"):
    super().__init__()
    self.split_id = base.check_split(split)
    self.split = split
    self.language = language
    self.batch_size = base.positive_int(batch_size, "train.batch_size")
    self.seq_len = base.positive_int(seq_len, "train.seq_len")
    self.seed = int(seed)
    self.loss_floor = language.entropy_rate
    self._positions = np.broadcast_to(np.arange(self.seq_len, dtype=np.int32),
                                      (self.batch_size, self.seq_len))

  @classmethod
  def from_config(cls, config, split: str) -> "SyntheticSource":
    """Builds the source from config.model.vocab_size, config.data.{num_domains, branching,
    seed, dirichlet_alpha} and config.train.{batch_size, seq_len}."""
    seed = base.data_seed(config)
    language = MarkovMixture(
        vocab_size=config.model.vocab_size,
        num_domains=config.data.get("num_domains", 8),
        branching=config.data.get("branching", 4),
        seed=seed,
        alpha=config.data.get("dirichlet_alpha", 1.0))
    return cls(language, config.train.batch_size, config.train.seq_len, seed=seed, split=split)

  def batch(self, index: int) -> dict[str, np.ndarray]:
    """Batch number `index`: inputs, targets, segment_ids, positions [B, S], domain [B]."""
    rng = base.make_rng(self.seed, base.TAG_BATCH, self.split_id, index)
    seq, domain = self.language.sample(rng, self.batch_size, self.seq_len + 1)
    return {
        "inputs": np.ascontiguousarray(seq[:, :-1]),
        "targets": np.ascontiguousarray(seq[:, 1:]),
        "segment_ids": np.ones((self.batch_size, self.seq_len), np.int32),
        "positions": self._positions.copy(),
        "domain": domain,
    }

  def bayes_nll(self, batch: dict[str, np.ndarray]) -> np.ndarray:
    """Bayes-optimal loss [B, S] (nats) of each target of a batch of this source."""
    seq = np.concatenate([batch["inputs"], batch["targets"][:, -1:]], axis=1)
    return self.language.bayes_nll(seq)

