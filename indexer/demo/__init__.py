"""Embedded examples that need no download."""
