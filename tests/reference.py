"""The float64 references the MoE tests share: the routers, the FFN forms and GShard's capacity
priority, written out from the papers in numpy (independent of moejax)."""
import math

import numpy as np


def softmax(z):
  z = np.asarray(z, np.float64)
  e = np.exp(z - z.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def sigmoid(z):
  return 1.0 / (1.0 + np.exp(-np.asarray(z, np.float64)))


def silu(z):
  return z / (1.0 + np.exp(-z))


def gelu(z):
  # jax.nn.gelu's default, the tanh approximation (Hendrycks & Gimpel 2016, eq. 2).
  return 0.5 * z * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (z + 0.044715 * z ** 3)))


def ffn(x, w, kind):
  """x [N, D], w {name: [D, F] or [F, D]} -> [N, D]."""
  if kind == "swiglu":
    return (silu(x @ w["gate"]) * (x @ w["up"])) @ w["down"]
  return gelu(x @ w["up"]) @ w["down"]


def route(logits, router, top_k, args=None):
  """Float64 routing of the `topk`, `sigmoid` and `switch` routers (at eval).

  Returns (expert_index [T, K], combine_weights [T, K], router_probs [T, E], margin): the
  smallest gap between a chosen score and the best unchosen one (a near-tie makes the float32
  decision ambiguous). Ties go to the lower index.
  """
  args = args or {}
  logits = np.asarray(logits, np.float64)
  score = sigmoid(logits) if router == "sigmoid" else softmax(logits)
  order = np.argsort(-score, axis=-1, kind="stable")
  idx = order[:, :top_k]
  top = np.take_along_axis(score, idx, -1)
  margin = np.inf
  if top_k < score.shape[1]:
    rest = np.take_along_axis(score, order[:, top_k:top_k + 1], -1)
    margin = float((top[:, -1:] - rest).min())
  if router == "topk" and args.get("softmax_order") == "after":
    weights = softmax(np.take_along_axis(logits, idx, -1))
  elif (router == "topk" and args.get("renormalize")) or (
      router == "sigmoid" and args.get("renormalize", True)):
    weights = top / top.sum(-1, keepdims=True)
  else:
    weights = top
  probs = score / score.sum(-1, keepdims=True) if router == "sigmoid" else score
  return idx, weights, probs, margin


def capacity_keep(idx, num_experts, routing_group, capacity):
  """GShard priority per routing group: first choices (token order) before second choices, ...;
  a copy is kept while its expert has fewer than `capacity` copies. idx [T, K] -> keep [T, K]."""
  t, k = idx.shape
  keep = np.zeros((t, k), bool)
  for g0 in range(0, t, routing_group):
    filled = np.zeros(num_experts + 1, int)
    for choice in range(k):
      for token in range(g0, g0 + routing_group):
        e = idx[token, choice]
        keep[token, choice] = e < num_experts and filled[e] < capacity
        filled[e] += 1
  return keep
