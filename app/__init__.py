"""The Gradio app over a gallery index (``reid_ssl app``).

``app.demo.build_demo(index, embedder) -> gr.Blocks`` builds it, ``app.demo.launch(demo, ...)`` serves it with the
safe settings; ``app.uploads`` checks untrusted uploads, ``app.detect`` finds people in whole frames. Importing
this package runs nothing.
"""
