"""nbval settings for the fluxlab notebooks (docs/ARCHITECTURE.md, "Notebooks").

A record (`fluxlab.store.record`) is shown as `application/vnd.fluxlab.record+json`; it carries a run id,
a UTC time and raw timings, so it differs on every run and is never compared. CI copies this file next to
the papermill-prepared notebooks it hands to `pytest --nbval-lax`.
"""

RECORD_MIME = "application/vnd.fluxlab.record+json"


def pytest_collectstart(collector):
    if getattr(collector, "path", None) is not None and collector.path.suffix == ".ipynb":
        collector.skip_compare = tuple(collector.skip_compare) + (RECORD_MIME,)
