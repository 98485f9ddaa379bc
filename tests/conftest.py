"""Eight simulated CPU devices for the sharding tests (set before jax is imported), the float64
mode the loss tests hold their plain-Python references to, and a compilation cache shared by the
pipelines the tests run as subprocesses."""

import os
import shutil
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import pytest  # noqa: E402

# The tiny pipelines that tests start as subprocesses compile the same programs again and again:
# one persistent compilation cache per test run (the xdist workers' controller's, else this
# process's) serves them all. Set after the import above, so the test processes themselves
# compile as before; only their children read it.
_OWNER = os.getppid() if "PYTEST_XDIST_WORKER" in os.environ else os.getpid()
JAX_CACHE = os.path.join(tempfile.gettempdir(), f"dqo_jax_tests_jax_cache_{_OWNER}")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", JAX_CACHE)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")


def pytest_sessionfinish(session):
  if not hasattr(session.config, "workerinput"):  # the controller, or a run without xdist
    shutil.rmtree(JAX_CACHE, ignore_errors=True)


@pytest.fixture(scope="module")
def x64():
  with jax.enable_x64(True):
    yield
