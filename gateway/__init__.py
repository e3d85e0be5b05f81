"""A token authorization gateway: flespi's token model in front of any HTTP API."""

__version__ = "0.1.0"
