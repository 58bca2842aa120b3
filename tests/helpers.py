"""Shared by tests: load configs by path and override fields by dotted name."""
import os

from moejax.config import load_config_file, set_fields  # noqa: F401  (tests import it here)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_config(name: str = "default", **overrides):
  """`configs/<name>.py`'s get_config() with dotted-name overrides."""
  return load_config_file(os.path.join(ROOT, "configs", f"{name}.py"), overrides)
