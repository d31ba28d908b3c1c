"""One compute job: settings, the batch and its annotations, frames fetched ahead, the engine
per location, uploads, and the safe replacement of originals (marks, convergence with other
jobs, confirmed deletions).

May import every layer below: engine, model, nimbus, fields, annotations, messages,
worker_info. Imports nothing here.
"""
