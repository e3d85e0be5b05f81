"""Storage: Redis I/O and its key layout, the lean RESP client, the embedded store, the token cache, accounts."""
