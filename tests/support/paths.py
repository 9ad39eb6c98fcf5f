"""Where things are, for tests at any depth of tests/."""

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
TESTS = REPO / "tests"
TEST_DATA = TESTS / "data"
SUPPORT = TESTS / "support"
TOOLS = REPO / "tools"
