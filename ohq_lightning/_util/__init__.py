"""Small utilities every stage may use: JSON round-trips, timing, caches on disk, progress bars.

This package sits at the bottom of the import layers (``docs/architecture.md``): it imports no other
module of ``ohq_lightning``.
"""
