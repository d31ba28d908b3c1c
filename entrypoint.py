"""NimbusImage entry point of the SAM2 Refiner worker.

The server runs the image's ENTRYPOINT with
``--apiUrl URL --token TOKEN --request {interface,compute} --parameters JSON [--datasetId ID]``.
All logic lives in the ``sam2_refine`` package; this file only hands over the arguments and
turns the result into the process exit status.
"""

import sys

from sam2_refine.cli import main

if __name__ == "__main__":
    sys.exit(main())
