"""Pure rules, no I/O: path safety, ACL matching, IP masks, origins, wildcards, the client address."""
