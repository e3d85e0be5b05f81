"""The data plane: the listener every connection starts on, the fast-path exchange, the bridge to
aiohttp, the upstream pool, aiohttp's relay and CORS."""
