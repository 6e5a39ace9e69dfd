"""JAX tests run on 8 CPU devices (the device count is fixed when jax starts, so it is set
before any test module imports jax); other device counts run in subprocesses."""

import os

import pytest
from devices import DEVICES_FLAG

os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {DEVICES_FLAG}=8".strip()


@pytest.fixture
def mesh():
    import jax

    assert len(jax.devices()) == 8, "jax was imported before tests/jax_adapter set 8 CPU devices"
    return jax.make_mesh((4, 2), ("data", "model"))
