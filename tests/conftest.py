import os
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
# Real checkpoints written by DeepSpeed and megatron-core (copied from ../shared/fixtures, read-only).
FIXTURES = TESTS / "fixtures"

# Test-side helpers (`from helpers import ...`). Not the tests folder itself: its sub-folders
# mirror the package (dsinfer/, formats/ ...) and would shadow it as namespace packages.
sys.path.insert(0, str(TESTS / "support"))


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    return FIXTURES
