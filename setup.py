"""moejax: Mixture-of-Experts language models in JAX/Flax NNX."""
from setuptools import find_packages, setup

# Lower bounds are the versions this code was tested with.
INSTALL_REQUIRES = [
    "jax>=0.10.2",
    "flax>=0.12.8",
    "optax>=0.2.8",
    "orbax-checkpoint>=0.12.8",
    "ml-collections>=1.1.0",
    "chex>=0.1.92",
    "numpy>=2.4",
    "scipy>=1.17",
    "tqdm>=4.70",
    "tensorboardX>=2.6.5",
    "matplotlib>=3.11",
    "absl-py>=2.5",
    # moejax.interop.hf reads and writes Hugging Face checkpoints (numpy only, never torch).
    "safetensors>=0.8",
]

# Parity tests of moejax.interop.hf against transformers (test-only: the loader never imports
# torch). torch is pinned: a bare `torch` pulls a CUDA build of several GB; 2.13.0's CPU build
# installs with plain pip here.
HF = [
    "torch==2.13.0",
    "transformers>=5.23.0",
]

# Real corpora (moejax/data: TFDS data sources, Grain pipeline, SentencePiece); no TensorFlow.
DATA = [
    "grain>=0.2.18",
    "tensorflow-datasets>=4.9.10",
    "array-record>=0.8.6",
    "sentencepiece>=0.2.3",
    # TFDS needs it (without declaring it) to build a dataset defined in a package, such as
    # moejax.data.tfds_builder.
    "importlib_resources>=7.1",
]

EXTRAS = {
    "data": DATA,
    "hf": HF,
    "test": [
        "pytest>=9.0",
        "pytest-xdist>=3.8",   # make test runs the test files in 2 processes
        "hypothesis>=6.155",
        "nbclient>=0.11",
        "nbformat>=5.11",
        "ipykernel>=7.4",
        *DATA,
        *HF,
    ],
    "notebooks": [
        "jupyterlab>=4.0",
    ],
    # Optional gmm backend `tokamax` (Google's Pallas kernels, tokamax.ragged_dot); installs beside
    # jax 0.10.2 (needs jax>=0.9.2; adds pydantic, qwix, jaxtyping, einshape, typeguard 2.13.3).
    "tokamax": [
        "tokamax>=0.0.12",
    ],
}

setup(
    name="moejax",
    version="0.1.0",
    description="Mixture-of-Experts language models in JAX/Flax NNX, from one CPU to a TPU pod.",
    packages=find_packages(include=["moejax", "moejax.*"]),
    python_requires=">=3.11",
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS,
)
