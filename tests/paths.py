"""Where the test data lives: inside the repository (tests/data), never beside it."""

from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "tests" / "data"
IMAGES = DATA / "images"
