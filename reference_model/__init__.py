"""A small GPT-2-architecture model trained offline, shipped with the repository (see README.md)."""
