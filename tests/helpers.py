"""Shared by tests: load configs by path and override fields by dotted name."""
import importlib.util
import os

from moejax.config import set_fields  # noqa: F401  (tests import it from here)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_config(name: str = "default", **overrides):
  """`configs/<name>.py`'s get_config() with dotted-name overrides."""
  path = os.path.join(ROOT, "configs", f"{name}.py")
  spec = importlib.util.spec_from_file_location(f"moejax_config_{name}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return set_fields(module.get_config(), overrides)
