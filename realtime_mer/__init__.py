"""realtime-mer: real-time micro-expression recognition."""

__version__ = "0.1.0"
