"""Default config: a small MoE LM that trains on 2 CPU cores in about two minutes.

About 0.9M parameters (0.4M active per token), 1,024 tokens per step, 1,500 steps: the eval loss
falls from ln(128) = 4.85 to within ~0.15 nats of the data's entropy-rate floor (~1.09).

8 experts, top-2, dropless dispatch (Mixtral-style, arXiv:2401.04088) on the embedded synthetic
mixture-of-domains data. Every other config in this folder starts from this one.
"""
import ml_collections


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0

  c.model = m = ml_collections.ConfigDict()
  m.vocab_size = 128
  m.d_model = 64
  m.num_layers = 4
  m.num_heads = 4
  m.num_kv_heads = 4       # < num_heads gives grouped-query attention
  m.head_dim = 16
  m.d_ff = 128             # hidden width of a dense FFN and of one (granularity-1) expert
  m.max_len = 128
  m.dtype = "float32"      # compute dtype
  m.param_dtype = "float32"
  m.moe_every = 1          # an MoE FFN every N layers (1: all layers, 0: dense model)
  m.tie_embeddings = True
  m.rope_theta = 10_000.0
  # Options of released MoE families (moejax.interop.hf; README, "Hugging Face checkpoints").
  m.norm_eps = 1e-6        # RMSNorm epsilon
  m.qkv_bias = False       # biases on the q, k, v projections (Qwen2-MoE)
  m.qk_norm = ""           # "" | "head" (per head, Qwen3-MoE) | "full" (over all heads, OLMoE)
  m.attention = "mha"      # "mha" | "mla": multi-head latent attention (DeepSeek-V2/V3), model.mla
  m.mla = mla = ml_collections.ConfigDict()
  mla.q_lora_rank = 0      # rank of the query latent (0: a full-rank query projection)
  mla.kv_lora_rank = 32    # rank of the key/value latent
  mla.rope_head_dim = 8    # the RoPE part of head_dim (the rest carries no position)
  mla.v_head_dim = 16      # value head width
  m.dense_d_ff = 0         # hidden width of the dense layers' FFN (0: d_ff)
  m.first_dense_layers = 0  # the first N layers are dense (DeepSeek-V3's first_k_dense_replace)
  m.dense_layers = ()      # more dense layers by 0-based index (Qwen2-MoE's mlp_only_layers)
  # Mixture-of-Depths (arXiv:2404.02258; README, "Expert variants"): every mod_every-th block
  # runs only the top mod_capacity of each sequence's tokens (0 or 1: off).
  m.mod_capacity = 0.0
  m.mod_every = 2
  m.mod_aux_loss_weight = 0.01  # the router's causal predictor loss (sec. 3.5)

  m.moe = moe = ml_collections.ConfigDict()
  moe.layer = "sparse"     # the MoE FFN (moejax.moe.variants.MOE_LAYERS): sparse | soft | ...
  moe.num_experts = 8
  moe.top_k = 2
  moe.granularity = 1      # E*G experts of width d_ff/G, top K*G (arXiv:2402.07871)
  moe.num_shared_experts = 0
  moe.shared_expert_gate = False  # scale the shared experts by sigmoid(x w) (Qwen2-MoE)
  moe.expert_type = "swiglu"
  moe.router = "topk"
  moe.router_args = ml_collections.ConfigDict()  # extra keyword arguments of the router
  moe.dispatch = "dropless"
  moe.capacity_factor = 1.25
  moe.routing_group = 64   # R: tokens routed together under capacity dispatch (one sequence)
  moe.gmm_backend = "blocked"  # padded row tiles; "ragged_dot": jax.lax.ragged_dot (moejax/kernels)
  # Dropless, gmm_backend "chunked", one expert shard: read the tokens through the sort index
  # instead of a [T*K, D] permuted copy (ScatterMoE's fused gather; less memory, a little slower).
  moe.fused_gather = False
  # Expert parallelism (mesh.expert > 1), dropless: how tokens reach their experts' shard
  # ("all_to_all" | "ring") and the buffers' size in average loads (0: worst case, no drops).
  moe.ep_exchange = "all_to_all"
  moe.ep_capacity_factor = 0.0
  # Load-balancing loss statistics over the global_batch | micro_batch (each device's share) |
  # sequence (DeepSeek-V3's sequence-wise loss); moejax.moe.layer.balance_groups.
  moe.lb_loss_scope = "global_batch"
  # Loss-free balancing (arXiv:2408.15664): per-expert selection bias moved by this much after
  # each step towards the mean load (0: off; top-k routers only).
  moe.bias_update_rate = 0.0
  moe.lb_loss_weight = 0.01
  moe.z_loss_weight = 0.001
  # Variants of the sparse layer (README, "Expert variants"); each default is the plain layer.
  moe.null_experts = 0     # AdaMoE null experts among the router's choices (arXiv:2406.13233)
  moe.extra_experts = ()   # MoE++ zero-computation experts: "zero" | "copy" | "constant" each
  moe.zero_compute_lb_weight = 1.0  # MoE++'s tau on their load-balancing terms
  moe.gating_residual = False  # MoE++: + the previous MoE layer's router logits through W_g
  moe.chain_iterations = 1  # Chain-of-Experts: C routed passes over one bank (arXiv:2506.18945)
  moe.expert_widths = ()   # HMoE: E hidden widths (arXiv:2408.10681); (): all d_ff/G
  moe.param_penalty_weight = 0.0  # HMoE's P-Penalty, towards the narrower experts
  moe.reuse_range = 1      # layer="rexmoe": borrow experts of MoE layers this far on each side
  moe.aoe_rank = 16        # layer="aoe": rank r of the factorised first projection
  moe.soft_slots_per_expert = 1  # layer="soft": P slots per expert (Soft MoE; not causal)
  moe.smear_routing = "prefix"  # layer="smear": prefix (causal) | sequence (the paper's; not)
  moe.mot_group_size = 4   # layer="mot": sequences mixed per position (Mixture of Tokens)
  moe.peer_experts = 16384  # layer="peer": N single-neuron experts, a perfect square
  moe.peer_heads = 8       # layer="peer": query heads
  moe.peer_top_k = 16      # layer="peer": experts per head, at most sqrt(N)
  moe.mh_heads = 2         # layer="multi_head": sub-tokens per token (MH-MoE)

  c.train = t = ml_collections.ConfigDict()
  t.steps = 1500
  t.batch_size = 16
  t.seq_len = 64
  t.lr = 1e-2
  t.warmup_steps = 100
  t.weight_decay = 0.01
  t.grad_clip = 1.0
  t.eval_every = 250
  t.eval_batches = 4
  t.checkpoint_every = 500
  t.keep_checkpoints = 3
  t.log_every = 50
  # Faults (moejax/faults.py). halt: stop at a NaN/Inf step, naming it; skip: drop its update.
  t.nan_policy = "halt"             # halt | skip
  t.max_skipped_steps = 10          # skip: more non-finite steps in a row than this halt the run
  t.preemption_check_every = 10     # several processes: agree on a SIGTERM every N steps
  t.heartbeat_timeout_s = 60        # several processes: a peer silent this long is dead

  c.data = d = ml_collections.ConfigDict()
  d.source = "synthetic"
  d.num_domains = 8        # latent domains of the synthetic language
  d.branching = 4          # successors per state in each domain's Markov chain
  d.dirichlet_alpha = 1.0  # concentration of each state's transition probabilities
  d.seed = 0               # the synthetic language and data order (independent of `seed`)
  d.eval_fraction = 0.1    # tail of each text file held out for eval (source="text")
  d.text_glob = ""         # files for source="text"
  # Real corpora (source="tfds:<name>[/<config>]" or "array_record:<glob>"; README, "Real corpora").
  d.tfds_data_dir = ""     # where `tfds build --file_format=array_record` prepared the dataset
  d.train_split = "train"  # TFDS splits; slicing works, e.g. "train[:99%]" / "train[99%:]"
  d.eval_split = "validation"
  d.text_feature = ""      # "" -> the feature named "text", or the dataset's only Text feature
  d.eval_glob = ""         # eval files for source="array_record:..." ("": hold out eval_fraction)
  d.tokenizer = "byte"     # byte (vocab 256) | sentencepiece (data.tokenizer_model)
  d.tokenizer_model = ""   # a SentencePiece .model file (python -m moejax.data.train_tokenizer)
  d.pack = True            # first-fit packing of documents into rows; False: one per row
  d.packing_bins = 16      # rows packed at once per row stream (more: less padding)
  d.worker_count = 0       # Grain worker processes (0: in the training process)

  c.mesh = mesh = ml_collections.ConfigDict()
  # "" or a preset layout: data | fsdp | ep_data | ep_fsdp | ep_tensor (moejax.sharding;
  # README, "Choosing a mesh"); a preset keeps mesh.expert and mesh.tensor, fills the rest.
  mesh.preset = ""
  mesh.data = -1           # -1: all remaining devices
  mesh.fsdp = 1
  mesh.expert = 1
  mesh.tensor = 1
  return c
