"""Helpers shared by the test modules (imported, never fixtures: those live in tests/conftest.py).
`tests/` is on the path (pytest's `pythonpath`), so the modules in every sub-folder import `support`."""
