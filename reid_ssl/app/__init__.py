"""The Gradio gallery-search app (``reid_ssl app``). Importing this package runs nothing."""
