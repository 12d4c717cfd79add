import pytest
import torch


@pytest.fixture
def one_torch_thread():
    """Tiny images: intra-op threads only add contention on a shared 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
