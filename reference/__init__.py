"""Slow, obviously-correct implementations: the oracles tests compare flowkern against (not installed)."""
