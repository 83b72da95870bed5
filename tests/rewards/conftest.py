"""The bubblewrap sandbox for the reward tests: ``sandbox_setup`` skips, with the reason, where
it cannot run."""

import pytest

from megatron_archer.rewards import bwrap
from megatron_archer.rewards.code_sandbox import SandboxUnavailable


@pytest.fixture(scope="module")
def sandbox_setup():
    try:
        return bwrap.require()
    except SandboxUnavailable as error:
        pytest.skip(f"bubblewrap sandbox unavailable here: {error}")
