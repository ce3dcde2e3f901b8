import os
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
# Real checkpoints written by DeepSpeed and megatron-core (copied from ../shared/fixtures, read-only).
FIXTURES = TESTS / "fixtures"

sys.path.insert(0, str(TESTS))  # test-side helpers: `import helpers`


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    return FIXTURES
