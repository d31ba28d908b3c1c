"""SAM2 Refine: a NimbusImage worker that refines rough polygon annotations with SAM2.

``entrypoint.py`` at the repository root wires the NimbusImage command line to
:mod:`sam2_refine.cli`. The package is layered; each layer imports only the ones below it
(``tests/test_layers.py`` holds the rules):

- :mod:`~sam2_refine.cli`, :mod:`~sam2_refine.interface`, :mod:`~sam2_refine.demo`: on top, the
  command line, the ``--request interface`` form, ``python -m sam2_refine.demo``.
- :mod:`sam2_refine.job`: one compute job, its stages and the safe replacement of originals.
- :mod:`sam2_refine.engine`: one location, image + originals -> outcomes; no server.
- :mod:`sam2_refine.model`: SAM2, its checkpoints and decoders; the only torch and sam2 imports.
- :mod:`sam2_refine.nimbus`: speaks NimbusImage (HTTP, frames, views, the stdout progress lines).
- Underneath: :mod:`~sam2_refine.fields` (the form's names, defaults and value rules),
  :mod:`~sam2_refine.annotations` (Location, Original, Refined, Kept),
  :mod:`~sam2_refine.messages` (sentences the user reads), :mod:`~sam2_refine.worker_info`
  (the image's name, labels and checkpoint directory). These import nothing of the package.
- :mod:`sam2_refine.testing`: the test doubles (local server, datasets, stand-in predictors).

No ``__init__.py`` imports anything: ``--request interface`` stays free of torch, and a
monkeypatch names the one module that runs the code.
"""

__version__ = "0.1.0"
