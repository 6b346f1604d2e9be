"""Interfaces: the pipeline (one front door for the command line and the book), the
command line, the tagger."""
