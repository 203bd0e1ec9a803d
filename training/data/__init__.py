"""Training datasets."""

from training.data.megc3db import CLASS_NAMES, DATABASES, Megc3DB, load_megc3db

__all__ = ["CLASS_NAMES", "DATABASES", "Megc3DB", "load_megc3db"]
