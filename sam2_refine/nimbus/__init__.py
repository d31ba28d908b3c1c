"""Speaks NimbusImage: the HTTP client (datasets, frames, annotations, connections), frame
decoding, dataset views, and the stdout progress lines NimbusImage reads from a worker.

May import: the modules of this package and :mod:`sam2_refine.messages`; nothing else of
sam2_refine. Imports nothing here.
"""
