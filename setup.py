from pathlib import Path

from setuptools import setup

version = {}
exec(Path("mixq/_version.py").read_text(), version)

setup(
    name="mixq",
    version=version["__version__"],
    description="Mixed-precision low-bit quantized inference for few-step text-to-image diffusion (MixDQ)",
    long_description=Path("README.md").read_text(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    # kernels/, calib/ and configs/ live at the top level of the repository and install as
    # subpackages of mixq, through the links mixq/kernels -> ../kernels (and the same for calib and
    # configs). They have no __init__.py on purpose: Python run from the repository root has the root
    # first on sys.path, and a folder without __init__.py is only a namespace portion, which never
    # takes precedence over an installed package of the same name (PEP 420); so the checkout cannot
    # shadow distributions that own top-level names such as `kernels` (a dependency of
    # transformers). The links, unlike package_dir, also resolve `mixq.kernels` from the root, where
    # `import mixq` finds the checkout's mixq/ first. tests/test_repository_root.py guards both.
    packages=["mixq", "mixq.kernels", "mixq.calib", "mixq.configs", "mixq.proving"],
    # The proving-ground pipeline ships as data: diffusers save_pretrained layout, fp16 safetensors.
    # activation_codes.c, packed_gemm.c and their header: compiled on first use by kernels/native.py.
    package_data={"mixq.configs": ["*.yaml"], "mixq.kernels": ["*.c", "*.h"],
                  "mixq.proving": ["pipeline/*", "pipeline/*/*", "color-swap-lora/*"]},
    install_requires=[
        "torch>=2.3",
        "diffusers>=0.39",  # the quantizer hooks mixq's backend uses (tested on 0.39.0 and 0.42.1)
        "accelerate",  # diffusers loads weights once, in place (low_cpu_mem_usage), only with it
        "transformers>=4.40",
        "triton>=3.6",  # the kernels are compiled and gated under 3.6 and 3.9 (benchmarks/results/static)
        "pulp>=2.8,<4",
        "numpy",
        "huggingface-hub",
        "safetensors",
        "PyYAML",
        "tqdm",
        "matplotlib",
    ],
    extras_require={
        "test": ["pytest", "pytest-benchmark", "pytest-xdist", "peft"],
        "bench": ["pytest-benchmark"],
    },
    entry_points={"console_scripts": ["mixq-calibrate=mixq.calibrate:main"]},
)
