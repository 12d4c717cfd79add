import pytest


@pytest.fixture
def one_torch_thread(torch_threads):
    """Tiny images: intra-op threads only add contention on a shared 2-core machine."""
    torch_threads(1)
