"""rlad_megatron: RL-aware distillation (RLAD / TRRD) for Megatron-core students and teachers."""

from pathlib import Path

from setuptools import find_packages, setup

setup(
    name="rlad_megatron",
    version="0.1.0",
    description="Reinforcement-aware knowledge distillation (RLAD/TRRD) on Megatron-core with SGLang rollouts",
    long_description=Path("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=find_packages(include=["rlad_megatron", "rlad_megatron.*"]),
    install_requires=[
        # CPU boxes: install torch==2.13.0 first (the CPU wheel); an unpinned torch pulls a CUDA build.
        "torch>=2.6",
        # 0.16.1: newest wheel for Python 3.11 (CPU CI); 0.19.x: Python 3.12 GPU images.
        "megatron-core>=0.16.1,<0.20",
        "psutil",  # undeclared by megatron-core, needed by dist_checkpointing.save
        "numpy",
        "transformers>=4.51",
        "safetensors",
        "tokenizers",
        "pyarrow",
        "reasoning-gym>=0.1.25",
        "math-verify>=0.9",
        "nvidia-modelopt>=0.33",
        "requests",  # undeclared by nvidia-modelopt, imported by modelopt.torch.utils
        "tqdm",
        "tensorboard",
        "matplotlib",
    ],
    extras_require={
        "test": ["pytest>=8", "pytest-xdist>=3", "ruff", "import-linter>=2.1"],
        # apex is optional (fused Adam/norms): build it from source, it has no usable PyPI wheel.
        "gpu": ["transformer-engine[pytorch]>=2.4", "sglang>=0.5.4", "torch_memory_saver", "sglang-router"],
    },
    entry_points={
        "console_scripts": [
            "rlad-train=rlad_megatron.train:main",
            "rlad-eval=rlad_megatron.eval:main",
        ]
    },
)
