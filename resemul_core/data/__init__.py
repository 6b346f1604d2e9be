"""Data: decoding audio, reading datasets and their splits, and the segment store."""
