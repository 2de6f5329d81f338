"""The synthetic consolidation experiment (see README.md in this folder)."""
