"""Which CPU kernels the zoo trains with (``zoo.kernels``).

Float training is deterministic on one code path, but torch picks its vectorised kernels by what
the CPU offers (AVX-512 here, AVX2 elsewhere), and they round differently: the zoo trained here
and on an AVX2 machine differ (bench/zoo_code_paths.py: 0.06 in a weight after 300 steps, from
rounding the training then amplifies; float64 does not help). ``avx2`` pins every library to its
AVX2 kernels (torch's ATen dispatch, MKL's conditional numerical reproducibility, oneDNN's ISA
limit) and the zoo's jobs to one thread, so the zoo is the same on every x86-64 CPU with AVX2,
with the same package versions. The variables are read when the libraries load: set them before
torch is imported (the zoo's scripts do it first).
"""

from __future__ import annotations

import os
import sys

KERNELS: dict[str, dict[str, str]] = {
    "native": {},
    "avx2": {"ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2"},
}


def pin_kernels(kernels: str) -> dict[str, str]:
    """Set the environment of ``kernels`` for this process (before torch loads); returns it."""
    env = KERNELS[kernels]
    if env and "torch" in sys.modules:
        raise RuntimeError("zoo.kernels: torch is already loaded; pin the kernels before importing it")
    os.environ.update(env)
    return env
