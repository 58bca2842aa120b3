"""moejax.moe.analysis: expert-domain mutual information against a hand computation, and the
routing trace against the model's own metrics and a hand-run first block."""
import math

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from helpers import load_config
from moejax.data import make_source
from moejax.model import Transformer
from moejax.moe.analysis import (expert_domain_mutual_information, layer_domain_counts,
                                 layer_mutual_information, mutual_information_of_counts,
                                 routing_trace, token_domains)
from moejax.moe.layer import MoELayer


def _entropy(counts: list[int]) -> float:
  n = sum(counts)
  return -sum(c / n * math.log(c / n) for c in counts if c)


def test_mi_equals_hand_computed_table():
  """Copies (expert, domain), sentinel 3 = no expert left out: (0,0) x2, (1,0), (1,1) x2,
  (2,1); I = H(expert) + H(domain) - H(expert, domain) from those counts."""
  e_none = 3
  expert_index = np.array([[0, 1], [0, e_none], [1, 2], [1, e_none], [e_none, e_none]])
  domain = np.array([0, 0, 1, 1, 0])
  # Joint counts written out by hand from the table above.
  joint = {(0, 0): 2, (1, 0): 1, (1, 1): 2, (2, 1): 1}
  h_e = _entropy([2, 3, 1])          # experts 0, 1, 2
  h_d = _entropy([3, 3])             # domains 0, 1
  h_ed = _entropy(list(joint.values()))
  expected = h_e + h_d - h_ed
  got = expert_domain_mutual_information(expert_index, domain, num_experts=3, num_domains=2)
  assert got == pytest.approx(expected, abs=1e-12)
  assert expected > 0.1   # a table where the answer is not trivially 0


def test_mi_zero_when_routing_ignores_the_domain():
  """Every domain sends its copies to the experts in the same proportions."""
  num_experts, num_domains = 4, 3
  per_domain = np.array([0, 0, 1, 2, 3, 3, 3, 1])         # one routing pattern, 8 tokens
  expert_index = np.tile(per_domain, num_domains)[:, None]
  domain = np.repeat(np.arange(num_domains), len(per_domain))
  assert expert_domain_mutual_information(expert_index, domain, num_experts,
                                          num_domains) == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("num_experts,num_domains", [(4, 4), (8, 4), (2, 4)])
def test_mi_of_a_bijection_is_log_min(num_experts, num_domains):
  """Uniform domains; the expert is a function of the domain that is one-to-one where E >= M
  (expert = 2d or a permutation) and onto where E < M (expert = d mod E): log(min(E, M))."""
  domain = np.repeat(np.arange(num_domains), 5)
  if num_experts == num_domains:
    expert = np.array([2, 0, 3, 1])[domain]
  elif num_experts > num_domains:
    expert = 2 * domain
  else:
    expert = domain % num_experts
  got = expert_domain_mutual_information(expert[:, None], domain, num_experts, num_domains)
  assert got == pytest.approx(math.log(min(num_experts, num_domains)), abs=1e-12)


def test_mi_of_no_routed_copy_is_zero():
  assert expert_domain_mutual_information(np.full((4, 2), 5), np.zeros(4, int), 5, 2) == 0.0


def _tiny_config(**overrides):
  return load_config(**{"model.d_model": 32, "model.num_layers": 2, "model.num_heads": 2,
                        "model.num_kv_heads": 2, "model.head_dim": 16, "model.d_ff": 32,
                        "model.vocab_size": 32, "model.max_len": 16, "model.moe.num_experts": 4,
                        "train.batch_size": 4, "train.seq_len": 16, "data.num_domains": 2,
                        "data.branching": 2, **overrides})


@pytest.fixture(scope="module")
def tiny():
  config = _tiny_config()
  model = Transformer(config.model, rngs=nnx.Rngs(0))
  batch = make_source(config, "eval").next()
  return config, model, batch


def test_trace_matches_the_models_metrics_and_a_hand_run_first_block(tiny):
  config, model, batch = tiny
  trace = routing_trace(model, batch)
  assert sorted(trace) == ["layer_0", "layer_1"]
  t, k, e = 4 * 16, config.model.moe.top_k, config.model.moe.num_experts
  for routing in trace.values():
    assert routing.expert_index.shape == (t, k)
  # The trace is the same forward pass as the model's: its loads are the model's metrics.
  _, aux = model(jnp.asarray(batch["inputs"]), jnp.asarray(batch["positions"]),
                 jnp.asarray(batch["segment_ids"]), train=False)
  for name, routing in trace.items():
    load = np.bincount(np.asarray(routing.expert_index).ravel(), minlength=e + 1)[:e]
    np.testing.assert_allclose(load / load.sum(), np.asarray(aux.layers[name]["load"]),
                               atol=1e-6)
  # Layer 0 by hand: embed, attention block, then the router on the normed residual.
  block = model.blocks[0]
  x = model.embed[...][jnp.asarray(batch["inputs"])]
  x = x + block.attn(block.attn_norm(x), jnp.asarray(batch["positions"]),
                     jnp.asarray(batch["segment_ids"]))
  h = block.ffn_norm(x).reshape(t, -1)
  expected = block.ffn.route(h, jnp.asarray(batch["segment_ids"]).reshape(t) > 0)
  np.testing.assert_array_equal(np.asarray(trace["layer_0"].expert_index),
                                np.asarray(expected.expert_index))
  np.testing.assert_allclose(np.asarray(trace["layer_0"].combine_weights),
                             np.asarray(expected.combine_weights), atol=1e-5)
  assert "<locals>" not in MoELayer.route.__qualname__   # the wrapper is gone again


def test_trace_names_only_moe_layers():
  config = _tiny_config(**{"model.num_layers": 4, "model.moe_every": 2})
  model = Transformer(config.model, rngs=nnx.Rngs(1))
  batch = make_source(config, "eval").next()
  assert sorted(routing_trace(model, batch)) == ["layer_1", "layer_3"]


def test_layer_mutual_information_is_within_bounds(tiny):
  config, model, batch = tiny
  assert token_domains(batch).shape == (4 * 16,)
  mi = layer_mutual_information(model, [batch, make_source(config, "eval").next()],
                                config.data.num_domains)
  assert sorted(mi) == ["layer_0", "layer_1"]
  for value in mi.values():
    assert 0.0 <= value <= math.log(2) + 1e-9


def test_layer_counts_hold_every_routed_copy_and_give_the_same_mi(tiny):
  """Pooled counts over two batches: every token's K copies (dropless top-k routes them all),
  and the MI of the pooled table equals the MI of the concatenated expert indices."""
  config, model, batch = tiny
  batches = [batch, make_source(config, "eval").next()]
  counts = layer_domain_counts(model, batches, config.data.num_domains)
  index = {name: np.concatenate([np.asarray(routing_trace(model, b)[name].expert_index)
                                 for b in batches]) for name in counts}
  domains = np.concatenate([token_domains(b) for b in batches])
  for name, table in counts.items():
    assert table.shape == (config.model.moe.num_experts, config.data.num_domains)
    assert table.sum() == 2 * 4 * 16 * config.model.moe.top_k
    assert mutual_information_of_counts(table) == pytest.approx(
        expert_domain_mutual_information(index[name], domains, config.model.moe.num_experts,
                                         config.data.num_domains), abs=1e-12)
