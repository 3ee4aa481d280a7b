"""The Gradio gallery-search app (``reid_ssl app``), one module per job:

* :mod:`~reid_ssl.app.service`: what the app does (search, gallery uploads, full-frame detection), no gradio;
* :mod:`~reid_ssl.app.inputs`: raw client values checked and bounded (payloads, k, threshold, camid);
* :mod:`~reid_ssl.app.text`: what the user reads (captions, the match verdict, notes);
* :mod:`~reid_ssl.app.files`: the bounded JPEG copies it shows;
* :mod:`~reid_ssl.app.uploads`: untrusted images and zips, checked before anything reaches the index;
* :mod:`~reid_ssl.app.ui`: ``build_demo(index, embedder) -> gr.Blocks``;
* :mod:`~reid_ssl.app.serve`: ``launch`` with the safe settings, the offline environment, logins.
* :mod:`~reid_ssl.app.browser`: the app in headless Chromium kept on loopback (screenshots, browser tests).

Importing this package or any of its modules imports no gradio and changes no environment variable.
"""
