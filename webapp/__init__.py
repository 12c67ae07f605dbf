"""The captioning web page of ``app.py`` and of the exported Hugging Face Space: a Gradio app over
:mod:`models.api` (``service``: requests to captions; ``render``: results to HTML; ``ui``: the Gradio page;
``space``: the Space folder)."""
