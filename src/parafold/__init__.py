"""parafold: high-throughput AlphaFold2, its CPU and GPU stages split, overlapped and cached."""

__version__ = "0.1.0"
