"""Analysis: clip-level evaluation, the excitation analysis, figures."""
