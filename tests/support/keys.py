"""Keys the test gateways are started with."""

MASTER_KEY = "M" * 32 + "a" * 32
