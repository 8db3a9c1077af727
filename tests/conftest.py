"""Fixtures shared by the test modules."""
import pytest
import torch as t


@pytest.fixture(scope="module")
def one_thread():
    """One PyTorch thread for a module: its tensors are small, extra threads only add overhead,
    and on a busy machine oversubscribed threads make the tests many times slower. It is also
    what train_2d.py does by default (--num_threads 1)."""
    threads = t.get_num_threads()
    t.set_num_threads(1)
    yield
    t.set_num_threads(threads)
