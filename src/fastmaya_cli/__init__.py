"""fastmaya: batch audiobook rendering with Maya1."""

__version__ = "0.1.0"
