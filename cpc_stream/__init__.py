"""cpc-stream runtime: streaming CPC representations over ZeroMQ. Imports numpy, never torch."""

__version__ = "0.1.0"
