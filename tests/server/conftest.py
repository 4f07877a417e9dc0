"""Fixtures of the server tests: one tiny-Llama engine per module, sized for
concurrent clients."""

import pytest

import plait


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir) -> str:
    return tiny_model_dir("llama")


@pytest.fixture(scope="module")
def engine(model_dir):
    with plait.Engine(model=model_dir, max_total_tokens=8192, max_running_requests=64) as eng:
        yield eng
