"""Eight simulated CPU devices for the sharding tests (set before jax is imported), and the
float64 mode the loss tests hold their plain-Python references to."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture(scope="module")
def x64():
  with jax.enable_x64(True):
    yield
