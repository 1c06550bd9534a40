"""Fresh random inputs on every run: each test draws its own seed and prints it on failure.

Set NESTED_JAX_TEST_SEED=<int> to replay a failing draw.
"""

import os
import secrets

import pytest


@pytest.fixture
def seed(request):
    value = int(os.environ.get("NESTED_JAX_TEST_SEED", secrets.randbits(31)))
    request.node.user_properties.append(("seed", value))
    print(f"[{request.node.name}] NESTED_JAX_TEST_SEED={value}")
    return value
