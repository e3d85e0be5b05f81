"""Helpers shared by the test modules (imported, never fixtures: those live in conftest.py)."""
