"""Depth Anything 3 as a serverless endpoint."""

__version__ = "0.1.0"
