import os

import pytest

# Tests choose their backend explicitly; a FASTELECTRA_BACKEND from the caller's shell would override it.
os.environ.pop("FASTELECTRA_BACKEND", None)


@pytest.fixture(autouse=True)
def _skip_gpu_tests_without_cuda(request):
    """`gpu`-marked tests run only where CUDA is available (checked at run time, not collection)."""
    if request.node.get_closest_marker("gpu") is not None:
        import torch

        if not torch.cuda.is_available():
            pytest.skip("needs a CUDA GPU")
