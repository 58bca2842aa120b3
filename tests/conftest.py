"""Test set-up: 8 simulated CPU devices and JAX's persistent compilation cache.

XLA_FLAGS must be set before jax is imported anywhere, so it happens here, at collection time.
"""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

_CACHE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ".jax_cache")
jax.config.update("jax_compilation_cache_dir", _CACHE)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)

# `make test` runs the files in 2 pytest-xdist processes, one file at a time each (--dist loadfile,
# --no-loadscope-reorder), in the order below: the slowest files first (measured on 2 CPU cores,
# slowest first), then files not listed here (new ones), then the rest, so that both processes
# end at about the same time instead of one of them starting a 2-minute file last.
SLOW_FILES_FIRST = [
    "test_scale_out.py", "test_multihost.py", "test_train.py", "test_scaling_laws.py",
    "test_notebooks.py", "test_faults_disk.py", "test_layers.py", "test_scaling_sweep.py",
    "test_data_grain.py", "test_kernels_pallas.py", "test_faults_nan.py", "test_scaling_fit.py",
    "test_faults_config.py", "test_scaling_cli.py", "test_dispatch.py",
]
FAST_FILES = [
    "test_kernels.py", "test_model.py", "test_kernels_permute.py", "test_checkpoint.py",
    "test_data_packing.py", "test_routing.py", "test_scaling_optimal.py", "test_main.py",
    "test_metrics.py", "test_data.py", "test_config.py", "test_scaling_accounting.py",
    "test_data_tokenizers.py", "test_faults_data.py", "test_sharding.py", "test_registry.py",
]


def _file_rank(name: str) -> int:
  if name in SLOW_FILES_FIRST:
    return SLOW_FILES_FIRST.index(name)
  return len(SLOW_FILES_FIRST) + (1 + FAST_FILES.index(name) if name in FAST_FILES else 0)


def pytest_collection_modifyitems(items):
  # A stable sort: the tests of a file keep their order.
  items.sort(key=lambda item: _file_rank(item.path.name))
