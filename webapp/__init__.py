"""The captioning web page of ``app.py``: a small HTTP server (standard library) over :mod:`models.api`."""
