"""reid_ssl.distributed: device names a user gives are checked before any tensor moves."""

from __future__ import annotations

import pytest
import torch

from reid_ssl.distributed import resolve_device
from reid_ssl.errors import InputError


def test_cpu_and_auto_resolve_and_bad_names_are_input_errors() -> None:
    assert resolve_device("cpu") == torch.device("cpu") and resolve_device(None).type in ("cpu", "cuda")
    with pytest.raises(InputError, match="not a device name"):
        resolve_device("gpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without CUDA")
def test_cuda_without_a_gpu_is_a_user_error_naming_the_fix() -> None:
    for name in ("cuda", "cuda:1"):
        with pytest.raises(InputError, match="no usable CUDA device; use cpu"):
            resolve_device(name)
