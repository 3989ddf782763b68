"""Builders shared by pinsface's tests and its benchmarks (``bench/``), as ``numpy.testing`` is: user-like
photos made from real faces, a corpus of awkward files, and waiting for a server. Nothing else in pinsface
imports this package."""
