"""moejax.interop.hf against transformers: tiny random models of each family, built in code (no
download) and saved with `save_pretrained`, load into moejax with the same float32 logits
(max |error| / max |logit| <= 1e-5) and the same router logits per layer; exported back, they
load in transformers with the same logits. Also: a sharded checkpoint (index file) on an
8-device mesh, the command line, missing/unused tensors, and the refusals.

torch and transformers are test-only (the `hf` extra); the loader never imports torch.
"""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from moejax import sharding  # noqa: E402
from moejax.interop import hf as mhf  # noqa: E402
from moejax.interop.hf.probe import router_logits  # noqa: E402
from moejax.moe import ROUTERS  # noqa: E402

from helpers import load_config  # noqa: E402

B, S, V = 2, 10, 64
TOL = 1e-5
SMALL = dict(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
# family -> (config class, model class, config fields beyond SMALL)
FAMILIES = {
    "mixtral": ("MixtralConfig", "MixtralForCausalLM",
                dict(num_local_experts=4, num_experts_per_tok=2, rope_theta=1e4)),
    # Layer 0 dense (mlp_only_layers), layer 1 MoE with the gated shared expert and qkv biases.
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM",
                  dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
                       shared_expert_intermediate_size=32, mlp_only_layers=[0])),
    # head_dim 16 != hidden/heads; renormalised top-k.
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM",
                  dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
                       head_dim=16, norm_topk_prob=True)),
    "olmoe": ("OlmoeConfig", "OlmoeForCausalLM",
              dict(num_experts=4, num_experts_per_tok=2, eos_token_id=2)),
    # MLA with a query latent, interleaved RoPE (the released layout), one dense layer, 4 expert
    # groups of 2 of which 2 are kept, a shared expert and routed scaling.
    "deepseek_v3": ("DeepseekV3Config", "DeepseekV3ForCausalLM",
                    dict(num_hidden_layers=3, num_key_value_heads=4, n_routed_experts=8,
                         num_experts_per_tok=2, moe_intermediate_size=16, n_group=4,
                         topk_group=2, q_lora_rank=24, kv_lora_rank=16, qk_rope_head_dim=4,
                         qk_nope_head_dim=8, v_head_dim=6, first_k_dense_replace=1,
                         n_shared_experts=1, routed_scaling_factor=2.5)),
}
# jax.lax.ragged_dot compiles faster than the default blocked kernel on these tiny shapes (the
# numbers are the same: tests/test_kernels.py).
FAST = {"model.moe.gmm_backend": "ragged_dot"}
NAMES = [n for n in FAMILIES if n != "deepseek_v3" or "deepseek" in ROUTERS]


def _hf_model(name, **extra):
  """A tiny transformers model of family `name` with every weight random (norm scales around 1,
  biases and DeepSeek's correction bias non-zero, so each reaches the logits)."""
  cfg_cls, model_cls, fields = FAMILIES[name]
  config = getattr(transformers, cfg_cls)(**{**SMALL, **fields, **extra})
  torch.manual_seed(0)
  model = getattr(transformers, model_cls)(config).eval()
  with torch.no_grad():
    for n, p in list(model.named_parameters()) + list(model.named_buffers()):
      if not p.is_floating_point() or "rotary" in n or "inv_freq" in n:
        continue
      if n.endswith("norm.weight"):
        p.copy_(1 + 0.2 * torch.randn_like(p))
      elif n.endswith("bias"):
        p.copy_(0.2 * torch.randn_like(p))
      else:
        p.copy_(0.3 * torch.randn_like(p) / p.shape[-1] ** 0.25)
  return model


def _ids(rows=B):
  return np.random.default_rng(1).integers(0, V, (rows, S))


def _hf_run(model, ids):
  with torch.no_grad():
    out = model(torch.tensor(ids), output_router_logits=True)
  return out.logits.numpy(), [r.numpy() for r in out.router_logits]


def _rel_err(a, ref):
  return float(np.max(np.abs(np.asarray(a, np.float64) - ref)) / np.max(np.abs(ref)))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
  """{family: (folder, HF logits, HF router logits)} of the saved tiny models."""
  out = {}
  for name in NAMES:
    model = _hf_model(name)
    folder = str(tmp_path_factory.mktemp(name))
    model.save_pretrained(folder)
    out[name] = (folder, *_hf_run(model, _ids()))
  return out


@pytest.fixture(scope="module")
def loaded(saved):
  """{family: (moejax model, config, LoadReport)}."""
  return {name: mhf.load(folder, overrides=FAST) for name, (folder, *_) in saved.items()}


def _forward(model, ids):
  """(logits, {layer: router logits}) of a moejax model, in one jitted call."""
  graphdef, state = nnx.split(model)

  def run(state, ids):
    m = nnx.merge(graphdef, state)
    return m(ids)[0], router_logits(m, ids)
  return jax.jit(run)(state, jnp.asarray(ids))


@pytest.mark.parametrize("name", NAMES)
def test_logits_and_router_logits_match_transformers(name, saved, loaded):
  _, ref, ref_router = saved[name]
  model, _, report = loaded[name]
  assert report.unused == []
  logits, ours = _forward(model, _ids())
  assert _rel_err(logits, ref) <= TOL
  assert len(ours) == len(ref_router)
  for (layer, a), b in zip(sorted(ours.items()), ref_router):
    np.testing.assert_allclose(np.asarray(a), b, atol=TOL * np.abs(b).max(), err_msg=f"layer {layer}")


@pytest.mark.parametrize("name", NAMES)
def test_export_loads_in_transformers_with_the_same_logits(name, saved, loaded, tmp_path):
  _, ref, _ = saved[name]
  model, config, _ = loaded[name]
  mhf.save(nnx.to_pure_dict(nnx.state(model)), config, str(tmp_path))
  again = getattr(transformers, FAMILIES[name][1]).from_pretrained(str(tmp_path),
                                                                   dtype=torch.float32).eval()
  assert _rel_err(_hf_run(again, _ids())[0], ref) <= TOL


def test_sharded_checkpoint_on_an_8_device_mesh(tmp_path):
  """save_pretrained with a small max_shard_size writes several files and an index; the loader
  streams them into parameters sharded over an (expert 2, tensor 2, data 2) mesh."""
  assert jax.device_count() == 8
  model = _hf_model("qwen2_moe")
  model.save_pretrained(str(tmp_path), max_shard_size="20KB")
  assert os.path.isfile(tmp_path / "model.safetensors.index.json")
  assert len(list(tmp_path.glob("*.safetensors"))) > 2
  mesh = sharding.make_mesh(load_config(**{"mesh.expert": 2, "mesh.tensor": 2}).mesh)
  ours, _, report = mhf.load(str(tmp_path), mesh=mesh)
  assert report.unused == []
  experts, wq = ours.blocks[1].ffn.experts.w["gate"][...], ours.blocks[1].attn.wq[...]
  assert experts.sharding.spec[0] == "expert" and wq.sharding.spec[1] == "tensor"
  assert len(experts.addressable_shards) == 8
  ids = _ids(8)
  graphdef, state = nnx.split(ours)
  logits = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x)[0])(state, jnp.asarray(ids))
  assert _rel_err(logits, _hf_run(model, ids)[0]) <= TOL


def test_command_line_import_logits_export(saved, tmp_path):
  """import writes a config moejax.main can load and a step-0 train state the Trainer restores;
  logits writes the moejax logits; export writes a folder transformers loads."""
  from moejax import checkpoint
  from moejax.config import load_config_file
  from moejax.interop.hf.__main__ import main
  from moejax.train import Trainer
  folder, ref, _ = saved["qwen2_moe"]
  work, out = tmp_path / "work", tmp_path / "out"
  assert main(["import", "--hf_dir", folder, "--workdir", str(work)]) == 0
  config = load_config_file(str(work / "config.py"))
  assert config.model.moe.shared_expert_gate and config.model.dense_layers == (0,)
  trainer = Trainer(config)
  with checkpoint.Checkpointer(work / "checkpoints", keep=1, every=0) as ckpt:
    step, state, extra = ckpt.restore(abstract_state=trainer.abstract_state())
  assert step == 0 and "data" in extra
  assert int(state["step"]) == 0 and jax.tree.structure(state) == jax.tree.structure(
      trainer.abstract_state())
  np.save(tmp_path / "ids.npy", _ids())
  assert main(["logits", "--hf_dir", folder, "--input_ids", str(tmp_path / "ids.npy"),
               "--out", str(tmp_path / "logits.npy")]) == 0
  logits = np.load(tmp_path / "logits.npy")
  assert logits.dtype == np.float32 and logits.shape == (B, S, V)
  assert _rel_err(logits, ref) <= TOL
  assert main(["export", "--workdir", str(work), "--hf_dir", str(out)]) == 0
  again = transformers.Qwen2MoeForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
  assert _rel_err(_hf_run(again, _ids())[0], ref) <= TOL
  assert json.load(open(out / "config.json"))["model_type"] == "qwen2_moe"


def test_missing_tensors_are_an_error_and_unused_ones_are_listed(saved, tmp_path):
  from safetensors.numpy import load_file, save_file
  folder = saved["mixtral"][0]
  tensors = load_file(os.path.join(folder, "model.safetensors"))
  config = open(os.path.join(folder, "config.json")).read()
  (tmp_path / "config.json").write_text(config)
  extra = {**tensors, "model.layers.9.mtp.weight": np.zeros(3, np.float32)}
  save_file(extra, str(tmp_path / "model.safetensors"))
  _, _, report = mhf.load(str(tmp_path))
  assert report.unused == ["model.layers.9.mtp.weight"]
  del extra["model.layers.1.block_sparse_moe.experts.3.w2.weight"]
  save_file(extra, str(tmp_path / "model.safetensors"))
  with pytest.raises(mhf.MissingTensorsError, match="experts.3.w2.weight"):
    mhf.load(str(tmp_path))


def test_reader_reads_bfloat16_and_sharded_folders_without_torch(tmp_path):
  from safetensors.torch import save_file
  save_file({"a": torch.arange(4, dtype=torch.bfloat16)}, str(tmp_path / "one.safetensors"))
  save_file({"b": torch.ones(2)}, str(tmp_path / "two.safetensors"))
  reader = mhf.CheckpointReader(str(tmp_path))
  assert reader.names() == {"a", "b"}
  a = reader.read("a")
  assert a.dtype.name == "bfloat16" and a.astype(np.float32).tolist() == [0, 1, 2, 3]


@pytest.mark.parametrize("name,field,value", [
    ("mixtral", "sliding_window", 4096),
    ("mixtral", "tie_word_embeddings", True),
    ("mixtral", "rope_parameters", {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}),
    ("mixtral", "model_type", "jamba"),
    ("qwen2_moe", "use_sliding_window", True),
    ("qwen2_moe", "shared_expert_intermediate_size", 24),
    ("olmoe", "clip_qkv", 8.0),
    ("qwen3_moe", "hidden_act", "gelu"),
    ("deepseek_v3", "quantization_config", {"quant_method": "fp8"}),
    ("deepseek_v3", "topk_method", "greedy"),
])
def test_unsupported_options_are_refused_naming_the_field(name, field, value):
  cfg_cls, _, fields = FAMILIES[name]
  hf = getattr(transformers, cfg_cls)(**{**SMALL, **fields}).to_dict()
  hf[field] = value
  with pytest.raises(mhf.UnsupportedCheckpoint, match=f"config.json:{field}"):
    mhf.moejax_config(hf)


@pytest.mark.parametrize("overrides,field", [
    ({"model.qk_norm": "layer"}, "model.qk_norm"),
    ({"model.attention": "gqa"}, "model.attention"),
    ({"model.norm_eps": 0.0}, "model.norm_eps"),
    ({"model.first_dense_layers": 9}, "model.first_dense_layers"),
    ({"model.dense_layers": (7,)}, "model.dense_layers"),
    ({"model.moe.shared_expert_gate": True}, "model.moe.shared_expert_gate"),
    ({"model.attention": "mla", "model.mla.rope_head_dim": 3}, "model.mla.rope_head_dim"),
    ({"model.attention": "mla", "model.qk_norm": "head"}, "model.qk_norm"),
])
def test_model_options_are_validated(overrides, field):
  from moejax.config import validate_model
  from moejax.errors import ConfigError
  with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
    validate_model(load_config(**overrides).model)


def test_export_refuses_a_model_the_family_cannot_express(tmp_path):
  from moejax.errors import ConfigError
  config = load_config(**{"model.tie_embeddings": True})
  with pytest.raises(ConfigError, match="model.tie_embeddings"):
    mhf.save({}, config, str(tmp_path), model_type="mixtral")
  for field, value in (("model.moe.chain_iterations", 2), ("model.moe.layer", "soft")):
    config = load_config(**{"model.tie_embeddings": False, field: value})
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
      mhf.save({}, config, str(tmp_path), model_type="qwen3_moe")


def test_each_tensor_shape_is_checked_against_its_parameter():
  """nanoGPT's per-key shape assert: a transposed tensor of the right size is refused."""
  from moejax.interop.hf.tables import COPY, LINEAR, LINEAR_OUT
  w = np.zeros((6, 4), np.float32)                     # torch [out, in]
  assert LINEAR.load(w, (4, 2, 3)).shape == (4, 2, 3)
  assert LINEAR_OUT.load(w.T, (2, 3, 4)).shape == (2, 3, 4)
  for transform, shape in [(LINEAR, (6, 4)), (LINEAR_OUT, (6, 4)), (COPY, (4, 6))]:
    with pytest.raises(ValueError, match="does not fit"):
      transform.load(w, shape)
  np.testing.assert_array_equal(LINEAR.save(LINEAR.load(np.arange(24.0).reshape(6, 4),
                                                        (4, 2, 3))), np.arange(24.0).reshape(6, 4))


def test_deepseek_negative_correction_bias(tmp_path):
  model = _hf_model("deepseek_v3")
  with torch.no_grad():
    for n, b in model.named_buffers():
      if n.endswith("e_score_correction_bias"):
        b.sub_(2.0)
  model.save_pretrained(str(tmp_path))
  ours, _, _ = mhf.load(str(tmp_path), overrides=FAST)
  assert _rel_err(_forward(ours, _ids())[0], _hf_run(model, _ids())[0]) <= TOL
