"""nearestd: which printer or scanner is nearest to me, right now."""

__version__ = "0.1.0"
