"""Training, LOSO evaluation and export of the networks (imports realtime_mer, never the reverse)."""
