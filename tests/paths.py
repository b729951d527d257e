"""Where the test data lives: the shared photos sit beside the repository (../shared)."""

from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
IMAGES = REPO.parent / "shared" / "data" / "images"
