"""The bubblewrap sandbox for the reward tests: ``sandbox_setup`` skips, with the reason, where
it cannot run; ``launcher`` runs a test once per way of launching it (the warm pool, the default,
and bubblewrap per program)."""

import pytest

from megatron_archer.rewards import bwrap
from megatron_archer.rewards.code_sandbox import BWRAP, BWRAP_PER_RUN, SandboxUnavailable, configure_sandbox


@pytest.fixture(scope="module")
def sandbox_setup():
    try:
        return bwrap.require()
    except SandboxUnavailable as error:
        pytest.skip(f"bubblewrap sandbox unavailable here: {error}")


@pytest.fixture(params=[BWRAP, BWRAP_PER_RUN])
def launcher(request, sandbox_setup):
    """The sandbox every run of the test uses by default: "bwrap" (the warm pool) or "bwrap_per_run"."""
    configure_sandbox(request.param)
    yield request.param
    configure_sandbox(BWRAP)
