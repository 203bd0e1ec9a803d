"""Training, LOSO evaluation and export of the networks (imports realtime_mer, never the reverse)."""

from pathlib import Path

#: The repository: engines/, experiments/results/ and the default data beside it.
REPO_ROOT = Path(__file__).resolve().parents[1]
