"""DeepSeek-V3's router: sigmoid affinities, group-limited top-k, a selection bias, routed
scaling ("DeepSeek-V3 Technical Report", DeepSeek-AI 2024, arXiv:2412.19437, sec. 2.1.2)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from moejax.errors import ConfigError
from moejax.moe.routing.base import ROUTERS, Router, top_k_lowest_index


@ROUTERS.register("deepseek")
class DeepSeekRouter(Router):
  """Group-limited sigmoid top-k (DeepSeek-V3, arXiv:2412.19437, eqs. 12-16; node-limited
  routing of DeepSeek-V2, arXiv:2405.04434, sec. 2.2.4, in its V3 form):

    s_{t,e} = sigmoid(u_t . w_e)                      affinities
    c_{t,e} = s_{t,e} + b_e                           selection scores (b: the selection bias)
    score(group) = sum of the top 2 c_{t,e} in the group (E / num_groups experts each)
    keep the top `topk_groups` groups; the others' experts are out of the selection
    chosen = top-K of c over the kept experts
    g_{t,e} = s_{t,e} / sum_{chosen} s_{t,e'} (renormalize) * routed_scaling   gates

  The bias b is always kept (it is the checkpoint's `e_score_correction_bias`); it moves by
  loss-free balancing only when `model.moe.bias_update_rate` > 0. `router_probs` are the
  affinities normalised over the E experts (for the metrics and the sequence-wise balance loss,
  eq. 18).
  """
  selection_bias = True

  def __init__(self, d_model: int, num_experts: int, top_k: int, *, rngs: nnx.Rngs,
               param_dtype=jnp.float32, num_groups: int = 1, topk_groups: int = 1,
               routed_scaling: float = 1.0, renormalize: bool = True, **common):
    field = "model.moe.router_args."
    if not (isinstance(num_groups, int) and num_groups >= 1 and num_experts % num_groups == 0):
      raise ConfigError(field + "num_groups", num_groups, f"a divisor of the {num_experts} experts")
    per_group = num_experts // num_groups
    if num_groups > 1 and per_group < 2:
      raise ConfigError(field + "num_groups", num_groups,
                        "at most E/2: a group is scored by its top-2 experts")
    if not (isinstance(topk_groups, int) and 1 <= topk_groups <= num_groups
            and topk_groups * per_group >= top_k):
      raise ConfigError(field + "topk_groups", topk_groups,
                        f"an integer in [1, num_groups={num_groups}] whose groups hold at least "
                        f"top_k={top_k} experts")
    if not (isinstance(routed_scaling, (int, float)) and routed_scaling > 0):
      raise ConfigError(field + "routed_scaling", routed_scaling, "a number > 0")
    super().__init__(d_model, num_experts, top_k, rngs=rngs, param_dtype=param_dtype, **common)
    self.num_groups, self.topk_groups = num_groups, topk_groups
    self.routed_scaling, self.renormalize = float(routed_scaling), renormalize

  def uses_bias(self) -> bool:
    return True

  def decide(self, logits, *, train, rng, token_ids):
    """logits [T, E] -> (expert_index [T, K], combine_weights [T, K], probs [T, E])."""
    del train, rng, token_ids
    t, e = logits.shape
    scores = jax.nn.sigmoid(logits)                                       # s [T, E]
    choice = scores + self.bias[...]                                      # c [T, E]
    if self.num_groups > 1:
      grouped = choice.reshape(t * self.num_groups, e // self.num_groups)
      top2, _ = top_k_lowest_index(grouped, 2)
      group_score = jnp.sum(top2, axis=-1).reshape(t, self.num_groups)    # [T, groups]
      _, kept = top_k_lowest_index(group_score, self.topk_groups)         # [T, topk_groups]
      kept_mask = jnp.sum(jax.nn.one_hot(kept, self.num_groups, dtype=jnp.int32), axis=1) > 0
      expert_mask = jnp.repeat(kept_mask, e // self.num_groups, axis=1)   # [T, E]
      # The lowest finite float, not 0: with a negative bias b_e a kept expert's c_{t,e} can be
      # below 0, and a dropped group must still never win (as the reference code's -inf).
      choice = jnp.where(expert_mask, choice, jnp.finfo(jnp.float32).min)
    _, index = top_k_lowest_index(choice, self.top_k)
    weights = jnp.take_along_axis(scores, index, axis=-1)
    if self.renormalize:
      weights = weights / (jnp.sum(weights, axis=-1, keepdims=True) + 1e-20)
    return index, weights * self.routed_scaling, scores / jnp.sum(scores, axis=-1, keepdims=True)
