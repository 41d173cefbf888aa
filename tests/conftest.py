import os
import shutil

import pytest
import torch

# Tests choose their backend explicitly; a FASTELECTRA_BACKEND from the caller's shell would override it.
os.environ.pop("FASTELECTRA_BACKEND", None)
# Without a GPU the Triton kernels run on CPU tensors in Triton's interpreter. It must be chosen
# before triton is first imported, by whichever test module comes first.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _skip_gpu_tests_without_cuda(request):
    """`gpu`-marked tests run only where CUDA is available (checked at run time, not collection)."""
    if request.node.get_closest_marker("gpu") is not None:
        import torch

        if not torch.cuda.is_available():
            pytest.skip("needs a CUDA GPU")


@pytest.fixture(scope="module")
def one_thread():
    """One CPU thread for modules of tiny models: faster than two on a busy 2-core machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def extension_built():
    """For tests of the _C op: it must be usable where a C++ compiler exists (setup.py or the JIT
    build makes it); only a machine without any toolchain skips them."""
    from fastelectra import extension

    ok, why = extension.status()
    if not ok:
        if shutil.which(os.environ.get("CXX", "c++")) is not None:
            pytest.fail(f"a C++ compiler is here but fastelectra._C is unavailable: {why}")
        pytest.skip(f"no C++ compiler toolchain to build fastelectra._C: {why}")
