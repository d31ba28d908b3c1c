"""SAM2 Refine: a NimbusImage worker that refines rough polygon annotations with SAM2.

The package is laid out one job per module; `entrypoint.py` at the repository root wires the
NimbusImage command line to :mod:`sam2_refine.cli`.
"""

__version__ = "0.1.0"
