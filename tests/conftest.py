import sys
from pathlib import Path

# Import the library from this checkout (worktrees included), not from site-packages.
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "workflow"))
