"""Shared pieces: validation, the cost ledger, module surgery, the registry and result I/O."""
