"""The device side of shoal."""
