"""A token authorization gateway: flespi's token model in front of any HTTP API."""
from gateway.build import check_fresh

__version__ = "0.1.0"

check_fresh()
