"""The in-process worker fixtures of the integration tests, for the end-to-end attacks."""

from tests.integration.conftest import (  # noqa: F401 (fixtures are found by name)
    agent,
    requester,
    service,
    worker,
    worker_settings,
)
