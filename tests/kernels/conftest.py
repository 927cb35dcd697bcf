"""Kernel tests: on a CPU-only machine (CI) the Triton kernels run in the interpreter.

``TRITON_INTERPRET`` must be set before any ``@triton.jit`` function is created (our kernel
modules are imported by the test files, after this conftest). With a CUDA device the kernels
compile for it instead and the GPU-only tests run too.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

# the test files import their fp64 references from kernels_ref.py beside this file
sys.path.insert(0, str(Path(__file__).parent))

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture
def device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(1234)


@pytest.fixture(autouse=True)
def _no_tf32() -> object:
    """fp32 references must be fp32: cuDNN convolutions (HF's Conv3d patch embedding) default to
    TF32 on the GPU, ~1e-4 relative error, which would swamp fp32 comparisons."""
    old = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = old
