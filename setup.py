from setuptools import find_packages, setup

setup(
    name="megatron_prune",
    version="0.1.0",
    description=(
        "Activation-based importance estimation and pruning for dense and MoE LLMs, "
        "inside Megatron-Core, at any parallel layout."
    ),
    python_requires=">=3.10",
    packages=find_packages(include=["megatron_prune", "megatron_prune.*"]),
    install_requires=[
        "torch>=2.4",
        "megatron-core>=0.14,<0.18",
        "numpy",
        "safetensors>=0.4",
        "tqdm",
        "psutil",
    ],
    extras_require={
        "test": ["pytest>=7", "matplotlib", "transformers>=4.50"],
        "plot": ["matplotlib"],
    },
    entry_points={"console_scripts": ["megatron-prune=megatron_prune.cli:main"]},
)
