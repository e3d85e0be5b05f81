"""Background writers, each behind a bounded queue: accessed times, request logs, token logs, usage, housekeeping."""
