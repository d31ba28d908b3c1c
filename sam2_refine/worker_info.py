"""What the NimbusImage server reads about this worker: its name, image and Docker labels.

The Dockerfiles carry these labels verbatim; ``tests/test_packaging.py`` parses the Dockerfiles
and checks that they agree with this module, so the names live in one place.
"""

from __future__ import annotations

INTERFACE_NAME = "SAM2 Refiner"
INTERFACE_CATEGORY = "SAM2"
DESCRIPTION = (
    "Refines existing annotations with SAM2: each polygon's or rectangle's box, or each point, "
    "prompts the model, and the mask becomes a clean polygon that follows the object's boundary"
)
ANNOTATION_SHAPE = "polygon"
DEFAULT_IMAGE_NAME = "annotations/sam2_refine_worker:latest"

#: Default place of the SAM2 checkpoints inside the worker image (docs/nimbus-contract.md §7).
DEFAULT_CHECKPOINT_DIR = "/code/sam2/checkpoints"
#: Environment variable that overrides :data:`DEFAULT_CHECKPOINT_DIR`.
CHECKPOINT_DIR_ENV = "SAM2_CHECKPOINT_DIR"


def docker_labels(gpu: bool) -> dict[str, str]:
    """The labels the NimbusImage server reads to list and route this worker.

    Args:
        gpu: True for the CUDA image (routed to the GPU queue), False for the CPU-only image.

    Returns:
        Label name -> value, exactly as the Dockerfile must declare them.
    """
    return {
        "isUPennContrastWorker": "",
        "isAnnotationWorker": "",
        "isGPUWorker": "true" if gpu else "false",
        "interfaceName": INTERFACE_NAME,
        "interfaceCategory": INTERFACE_CATEGORY,
        "description": DESCRIPTION,
        "annotationShape": ANNOTATION_SHAPE,
        "defaultToolName": INTERFACE_NAME,
    }
