"""The MoE core, in the order data flows through it:

  routing/   registry `ROUTERS`, the typed `Routing`, one file per router family
  balance.py auxiliary losses and routing metrics
  dispatch/  capacity.py, dropless.py, expert_parallel.py (all-to-all, ring), under shard_map
  experts.py FFN forms, the expert bank (leading expert axis), shared experts
  layer.py   route -> permute -> grouped matmul -> unpermute and combine
  variants/  registry `MOE_LAYERS` (`model.moe.layer`): the sparse layer and the variants
  extra_experts.py, chain.py, heterogeneous.py: options of the sparse layer (zero-computation
             experts, Chain-of-Experts, heterogeneous widths); depth.py: Mixture-of-Depths
"""
from moejax.moe.dims import MoEDims, is_moe_layer, moe_dims
from moejax.moe.dispatch import DISPATCHERS, EP_EXCHANGES, DispatchPlan
from moejax.moe.experts import FFN_FORMS, GMM_BACKENDS, MLP, ExpertBank, ExpertFFN, SharedExperts
from moejax.moe.layer import MoELayer
from moejax.moe.routing import ROUTERS, Router, Routing
from moejax.moe.variants import MOE_LAYERS, MoEFFN

__all__ = ["MOE_LAYERS", "MoEFFN", "DISPATCHERS", "EP_EXCHANGES", "FFN_FORMS", "GMM_BACKENDS", "ROUTERS", "DispatchPlan",
           "ExpertBank", "ExpertFFN", "MLP", "MoEDims", "MoELayer", "Router", "Routing", "SharedExperts",
           "is_moe_layer", "moe_dims"]
