"""Deciding a request: the authenticator, the ordered checks and the compiler of stored records into tokens."""
