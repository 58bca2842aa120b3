"""Accounting against published figures (Mixtral 8x7B, OLMoE-1B-7B), the real moejax model's
parameter count, and Kaplan et al.'s (2020, arXiv:2001.08361) Table 1 FLOP formula."""
import importlib.util
import os

import pytest
from flax import nnx
import jax

from helpers import load_config
from moejax.errors import ConfigError
from moejax.model import Transformer
from moejax.scaling.accounting import flops_per_token, param_counts

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location(
    "published_models", os.path.join(REPO, "experiments", "scaling", "published_models.py"))
published = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(published)


def test_mixtral_8x7b_matches_published_counts():
  p = param_counts(published.mixtral_8x7b())
  assert round(p.total / 1e9, 1) == 46.7   # arXiv:2401.04088: 46.7B total
  assert round(p.active / 1e9, 1) == 12.9  # 12.9B active


def test_olmoe_matches_published_counts():
  p = param_counts(published.olmoe_1b_7b())
  assert round(p.total / 1e9, 1) == 6.9    # arXiv:2409.02060: 6.9B total
  assert round(p.active / 1e9, 1) == 1.3   # 1.3B active


def _model_param_count(config) -> int:
  shapes = nnx.eval_shape(lambda: Transformer(config.model, rngs=nnx.Rngs(0)))
  return sum(x.size for x in jax.tree.leaves(nnx.state(shapes, nnx.Param)))


@pytest.mark.parametrize("changes", [
    {},
    {"model.moe_every": 0},
    {"model.moe_every": 2, "model.tie_embeddings": False, "model.num_kv_heads": 2,
     "model.moe.granularity": 4, "model.moe.num_shared_experts": 2,
     "model.moe.expert_type": "gelu"},
])
def test_total_matches_the_model(changes):
  """The count equals the parameters moejax.model actually creates (abstractly, no memory)."""
  config = load_config()
  for path, value in changes.items():
    node = config
    *parents, leaf = path.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  assert param_counts(config).total == _model_param_count(config)


def test_active_counts_top_k_experts_only():
  c = load_config()
  m = c.model
  p = param_counts(c)
  expert = 3 * m.d_model * m.d_ff
  assert p.total - p.active == m.num_layers * (m.moe.num_experts - m.moe.top_k) * expert


def test_exact_flops_match_kaplan_table_1():
  """Dense GeLU model, causal: Kaplan's forward count 2N + 2 n_layer n_ctx d_attn plus their
  de-embedding 2 d_model n_vocab (Table 1), written out independently here."""
  c = load_config()
  m = c.model
  m.moe_every, m.moe.expert_type, m.tie_embeddings = 0, "gelu", True
  d, layers, ff, ctx, vocab = m.d_model, m.num_layers, m.d_ff, 128, m.vocab_size
  d_attn = m.num_heads * m.head_dim
  n = layers * (2 * d * ff + 4 * d * d_attn)           # Kaplan's N = 2 d n_layer (2 d_attn + d_ff)
  forward = 2 * n + 2 * layers * ctx * d_attn + 2 * d * vocab
  f = flops_per_token(c, seq_len=ctx, causal=True)
  assert f.exact == pytest.approx(3 * forward, rel=1e-12)
  assert f.six_n == pytest.approx(6 * (n + (2 * layers + 1) * d), rel=1e-12)  # + norm scales


def test_moe_flops_scale_with_active_not_total_experts():
  c = load_config()
  f8 = flops_per_token(c)
  c.model.moe.num_experts = 64
  f64 = flops_per_token(c)
  router = 3 * 2 * c.model.num_layers * c.model.d_model * (64 - 8)
  assert f64.exact - f8.exact == pytest.approx(router)


def test_errors_name_field_value_and_allowed():
  c = load_config()
  c.model.moe.expert_type = "relu"
  with pytest.raises(ConfigError, match=r"model\.moe\.expert_type.*'relu'.*swiglu"):
    param_counts(c)
  c = load_config()
  c.model.moe.granularity = 3
  with pytest.raises(ConfigError, match=r"model\.moe\.granularity.*3.*divisor"):
    param_counts(c)


@pytest.mark.parametrize("field,value", [
    ("model.moe.layer", "soft"), ("model.moe.null_experts", 4),
    ("model.moe.extra_experts", ("zero",)), ("model.moe.gating_residual", True),
    ("model.moe.chain_iterations", 2), ("model.moe.expert_widths", (64,) * 8),
    ("model.mod_capacity", 0.5)])
def test_expert_variants_are_refused_not_miscounted(field, value):
  """The variants change parameters or FLOPs the formulas do not count; the defaults (also as
  the lists a config.json gives back) are the plain model."""
  c = load_config()
  param_counts(c)
  c.model.moe.extra_experts, c.model.moe.expert_widths = [], []
  param_counts(c)
  *parents, leaf = field.split(".")
  node = c
  for p in parents:
    node = node[p]
  node[leaf] = value
  with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
    param_counts(c)
