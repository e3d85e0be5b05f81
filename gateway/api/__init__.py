"""The platform API (tokens, logs, recycle bin, subaccounts), its field validation and token templates."""
