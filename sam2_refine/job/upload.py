"""Refined annotations uploaded in chunks while the job goes on (:class:`Uploader`), after the
refinements on the server are read again: what another job refined meanwhile is not uploaded
twice (:func:`skip_refined_elsewhere`). The documents and their marks: :mod:`sam2_refine.job.replace`.
"""

from __future__ import annotations

import time

from sam2_refine.annotations import Location
from sam2_refine.job.converge import RefinementWatch
from sam2_refine.job.replace import Ledger, pending_upload, upload
from sam2_refine.job.settings import RefineSettings
from sam2_refine.nimbus.client import MAX_CHUNK, NimbusClient
from sam2_refine.nimbus.errors import NimbusAPIError


class Uploader:
    """Uploads refined annotations in chunks while the job goes on; stops at the first failure.

    Before each chunk the refinements on the server are read again: an original that another
    job refined meanwhile is not uploaded again (its refinement is its replacement)."""

    def __init__(self, client: NimbusClient, ledger: Ledger, settings: RefineSettings,
                 watch: RefinementWatch) -> None:
        self.client, self.ledger, self.settings, self.watch = client, ledger, settings, watch
        self.error: NimbusAPIError | None = None
        self._last = time.monotonic()

    def pending(self) -> int:
        """Refined shapes not uploaded yet."""
        return len(pending_upload(self.ledger))

    def flush(self, at_least: int = 1, or_after: float | None = None) -> None:
        """Upload what is pending if there are ``at_least`` documents, or any once ``or_after``
        seconds have passed since the last upload (no-op after a failure)."""
        waiting = self.pending()
        late = or_after is not None and time.monotonic() - self._last >= or_after
        if self.error is not None or not waiting or (waiting < at_least and not late):
            return
        self._last = time.monotonic()
        while self.error is None and self.pending():
            skip_refined_elsewhere(self.watch, self.ledger,
                                    {r.original_id: self.ledger.locations[r.original_id]
                                     for r in pending_upload(self.ledger)})
            if not self.pending():
                return
            report = upload(self.client, self.ledger, self.settings.dataset_id, self.settings.channel,
                            self.settings.output_tags, self.settings.keep_original_tags,
                            delete_original=self.settings.delete_originals, limit=MAX_CHUNK)
            self.error = report.error


def skip_refined_elsewhere(watch: RefinementWatch, ledger: Ledger, originals: dict[str, Location]) -> list[str]:
    """Read the refinements again; originals (id -> location) that another job has refined
    meanwhile get that refinement as their replacement. Returns their ids."""
    index = watch.read(set(originals.values()))
    if index is None:
        return []
    taken = []
    for original_id, location in originals.items():
        found = index.for_original(original_id, location)
        if found and original_id not in ledger.created:
            ledger.refined_by_another(original_id, location, found[0].id)
            taken.append(original_id)
    return taken
