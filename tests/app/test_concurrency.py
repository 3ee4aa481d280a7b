"""Many requests at once: searches answer correctly while others run and while a gallery upload is added."""

from __future__ import annotations

import time

from tests.helpers import person_zip


def test_twenty_simultaneous_searches_all_answer_correctly(served):
    from gradio_client import handle_file

    qs = [served.queries()[i % 5] for i in range(20)]
    expected = {q: served.captions(q, 5) for q in set(qs)}
    jobs = [served.client.submit(handle_file(str(q)), 5, api_name="/search") for q in qs]
    results = [job.result(timeout=180) for job in jobs]
    for q, (gallery, _) in zip(qs, results, strict=True):
        assert [item["caption"] for item in gallery] == expected[q]


def test_50_searches_answer_while_a_gallery_upload_is_added(served, tmp_path):
    from gradio_client import handle_file

    app = served.app
    zpath = person_zip(tmp_path / "batch.zip", range(60, 72))

    # Instrument the app: when each search finished, and when the upload held the index (made to take 6 s: on
    # 2 busy cores the first of 50 searches, each uploading its query through gradio_client, took up to 4.5 s).
    finished: list[float] = []
    window: list[float] = []
    real_search, real_add, real_embedder = app._search_feature, app._add_checked, app.embedder

    class SlowBatches:
        def __getattr__(self, name):
            return getattr(real_embedder, name)

        def embed_images(self, *a, **k):
            time.sleep(6.0)
            return real_embedder.embed_images(*a, **k)

    def timed_search(*a, **k):
        out = real_search(*a, **k)
        finished.append(time.monotonic())
        return out

    def timed_add(*a, **k):
        window.append(time.monotonic())
        try:
            return real_add(*a, **k)
        finally:
            window.append(time.monotonic())

    app._search_feature, app._add_checked, app.embedder = timed_search, timed_add, SlowBatches()
    try:
        q = served.queries()[3]
        before = [i["caption"] for i in served.search(q, 3)[0]]
        assert before == served.captions(q, 3)
        finished.clear()
        upload = served.client.submit([handle_file(str(zpath))], api_name="/add")
        deadline = time.monotonic() + 60
        while not window and time.monotonic() < deadline:
            time.sleep(0.02)
        jobs = [served.client.submit(handle_file(str(q)), 3, api_name="/search") for _ in range(50)]
        results = [job.result(timeout=300) for job in jobs]
        assert "Added **12** images" in upload.result(timeout=300)[0]
    finally:
        app._search_feature, app._add_checked, app.embedder = real_search, real_add, real_embedder
    after = [i["caption"] for i in served.search(q, 3)[0]]
    for gallery, _ in results:  # every search answered, with the gallery before or after the upload
        assert [item["caption"] for item in gallery] in (before, after)
    start, end = window
    during = [t for t in finished if start <= t <= end]
    assert len(finished) >= 50 and len(during) >= 3, (len(finished), len(during), end - start)
