"""Hugging Face MoE checkpoints in and out of moejax, with logits parity against transformers.

`load(hf_dir, mesh=...)` reads config.json and *.safetensors (sharded with an index too) into a
moejax `Transformer`, streaming each tensor into its mesh-sharded parameter; `save(params,
config, hf_dir)` writes them back for transformers. One module per family holds its config
translation and its name table (`tables.Tensor`): Mixtral (arXiv:2401.04088), Qwen2-MoE
(arXiv:2407.10671), Qwen3-MoE (arXiv:2505.09388), OLMoE (arXiv:2409.02060), DeepSeek-V3
(arXiv:2412.19437). `python -m moejax.interop.hf` is the command line (import, export, logits).
torch is never imported.
"""
from moejax.interop.hf.loader import (FAMILIES, CheckpointReader, LoadReport, MissingTensorsError,
                                      family, load, load_params, moejax_config, read_hf_config,
                                      save)
from moejax.interop.hf.tables import Tensor, Transform, UnsupportedCheckpoint

__all__ = ["FAMILIES", "CheckpointReader", "LoadReport", "MissingTensorsError", "Tensor",
           "Transform", "UnsupportedCheckpoint", "family", "load", "load_params",
           "moejax_config", "read_hf_config", "save"]
