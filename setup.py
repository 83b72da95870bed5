from setuptools import find_packages, setup

setup(
    name="megatron-archer",
    version="0.1.0",
    description="Entropy-aware RLVR (Archer dual-token constraints, forking tokens) on Megatron-core",
    packages=find_packages(include=["megatron_archer", "megatron_archer.*"]),
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.4",
        "numpy",
        "megatron-core>=0.16,<0.20",
        "transformers>=4.51,<6",
        "safetensors>=0.4",
        "math-verify[antlr4_13_2]>=0.7",
        "datasets>=3",
        "pyyaml",
        "tensorboard>=2.14",
        "matplotlib>=3.7",
        "tqdm",
        "psutil",  # megatron's checkpoint file writer (models.dist_checkpoint)
        "pyseccomp",  # the code sandbox's system-call filter (libseccomp2 from the system)
    ],
    extras_require={
        # triton runs the fused LM-head kernel on CUDA; on CPU its interpreter runs the tests.
        "dev": ["pytest>=8", "pytest-timeout", "ruff>=0.6",
                "triton>=3.0; platform_machine == 'x86_64'"],
        # benchmarks/rl_step.py: Hugging Face TRL's GRPOTrainer as the baseline (pinned: the
        # figures in benchmarks/RESULTS.md are for this version)
        "bench": ["trl==1.16.0"],
    },
    entry_points={"console_scripts": ["megatron-archer=megatron_archer.cli:main"]},
)
