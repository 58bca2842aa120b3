"""Checkpoints of other codebases in and out of moejax (`hf`: Hugging Face transformers)."""
