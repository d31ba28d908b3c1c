"""One location: the merged image and its originals -> one outcome per original (a refined
polygon, or kept with the reason). Pure computation: no server, no settings parser.

May import: the modules of this package, :mod:`sam2_refine.model.predictor`,
:mod:`sam2_refine.model.logits` and :mod:`sam2_refine.annotations`; never the job, nimbus or
fields. Imports nothing here.
"""
