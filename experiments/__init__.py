"""Experiments built on the distill library: each folder holds its own code, recipe, command and README."""
