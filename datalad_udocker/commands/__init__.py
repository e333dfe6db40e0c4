"""Thin DataLad command classes: parameters, one call, result records."""
