"""Test-wide settings.

Property-based tests (hypothesis) run derandomized: the same examples on every run, so CI is red
only when the code changed, never by the luck of the draw. To explore new examples locally (a
fuzzing session), run with ``HYPOTHESIS_PROFILE=explore`` and turn what it finds into a fixed test.
"""

import os

# Under pytest-xdist each worker is one of two processes on two cores: torch's default of one
# thread per core would put four busy threads on two cores, and torch's threads wait for each
# other (a step can run 20x slower). One thread per worker; subprocesses (torchrun) inherit it.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest
from hypothesis import settings

settings.register_profile("leanscale", derandomize=True, deadline=None, print_blob=True)
settings.register_profile("explore", derandomize=False, deadline=None, print_blob=True, max_examples=500)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "leanscale"))


@pytest.fixture
def one_thread():
    """Tiny models and fits run faster on one torch thread (and do not stall when other jobs share
    the 2-core machine); the thread count is restored afterwards. Modules that want it for every
    test say ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def static_encoder_dir(tmp_path_factory):
    """One distillation of the static MiniLM embedder for the whole session (~15-20 s on 2 cores):
    every test that needs ``leanscale.models.static_text_encoder`` shares this folder instead of
    distilling its own -- also across pytest-xdist workers (`make test`): the first to need it
    builds it in the session's shared temporary folder, under a file lock, and the other waits
    for it instead of distilling a second copy (~30-50 s beside the other worker)."""
    from filelock import FileLock  # a dependency of torch

    from leanscale.models import static_text_encoder

    if not os.environ.get("PYTEST_XDIST_WORKER"):  # no xdist: this process alone
        folder = tmp_path_factory.mktemp("static") / "minilm-static"
        static_text_encoder(folder)
        return folder
    shared = tmp_path_factory.getbasetemp().parent  # this session's folder, one per run, shared by the workers
    folder = shared / "static" / "minilm-static"  # alone in its folder, as mktemp's (a test checks no temporary is left)
    with FileLock(str(shared / "static.lock")):
        static_text_encoder(folder)  # builds it when missing, else checks the files
    return folder


def pytest_collection_modifyitems(config, items):
    """Slow tests first: under ``pytest -n 2 --dist loadfile`` (``make test``) a worker takes whole
    files in collection order, so the two-minute tour smoke test starts at once instead of being the
    last file left while the other worker idles."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)  # stable: otherwise collection order
