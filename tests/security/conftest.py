"""The in-process worker fixtures of the integration tests, for the end-to-end attacks."""

from tests.integration.conftest import *  # noqa: F403 (fixtures are found by name)
