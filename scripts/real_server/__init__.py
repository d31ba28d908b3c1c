"""The check against the real NimbusImage server's code (``scripts/check_real_server.py``).

Not part of the worker: the worker package never imports this. Modules:

- :mod:`.output`: every line with its database label, PASS/FAIL lines, the closing count (pure);
- :mod:`.checks`: the checks over snapshots of the server's annotations and connections (pure);
- :mod:`.venv`: the check's own virtual environment (Girder, the plugin, large_image), cached;
- :mod:`.girder_app`: the Girder server program (runs inside that environment);
- :mod:`.server`: starts and stops it;
- :mod:`.rest`: a small REST session that keeps every status and message;
- :mod:`.dataset`: a dataset made the way the web app makes one;
- :mod:`.worker`: runs the worker's ``entrypoint.py`` as NimbusImage does, recording its frames
  and its requests;
- :mod:`.recorder`: the request recorder (runs in the worker's Python);
- :mod:`.reads_probe`: the worker's own reads called one by one (runs in the worker's Python);
- :mod:`.reads`: the checks of those reads and of a job's recorded requests (pure);
- :mod:`.observe`: probes of server behaviours the local test server must imitate.
"""
