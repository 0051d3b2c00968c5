"""Shared-memory request statistics: layout, block lifecycle, readers."""
