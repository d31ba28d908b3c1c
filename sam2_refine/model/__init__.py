"""SAM2: the checkpoint catalogue (recognised from the weights, with sidecars), loading the model,
and decoding prompts into logits. The only modules that import torch and sam2
(:mod:`~sam2_refine.model.loading`, :mod:`~sam2_refine.model.sam2_model`,
:mod:`~sam2_refine.model.fast_decoder`; ``tests/test_layers.py`` checks it); the engine sees
the model through :class:`~sam2_refine.model.predictor.BoxPredictor` and
:mod:`~sam2_refine.model.logits`.

May import: the modules of this package, :mod:`sam2_refine.fields` (a sidecar's tuned defaults
are form values) and :mod:`sam2_refine.worker_info`. Imports nothing here.
"""
