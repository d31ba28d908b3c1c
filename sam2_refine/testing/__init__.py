"""Test and demo support: a local NimbusImage server, synthetic datasets, stand-in predictors.

Nothing here is used by a production job; it ships in the package so that the demo and the
benchmarks can use the same server the tests use.
"""
