"""Device choice and the runtime record of a result."""

from __future__ import annotations

import pytest
import torch

from fedct.devices import pick_device, runtime
from fedct.errors import FedctError


def test_runtime_records_the_threads_and_cpu_a_result_was_computed_with() -> None:
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = runtime(torch.device("cpu"), amp=False)
        torch.set_num_threads(2)
        two = runtime(torch.device("cpu"), amp=False)
    finally:
        torch.set_num_threads(before)
    assert (one["threads"], two["threads"]) == (1, 2)
    assert one["device"] == "cpu" and one["torch"] == torch.__version__
    assert one["bf16_autocast"] is False  # amp off: never autocast
    assert isinstance(one["cpu"], str) and one["cpu"]
    assert {k: v for k, v in one.items() if k != "threads"} == \
        {k: v for k, v in two.items() if k != "threads"}


def test_naming_a_missing_gpu_is_an_error_not_a_cpu_run() -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(FedctError, match="CUDA is not available"):
        pick_device("cuda")
