"""Writer processes for the index concurrency tests (light imports: numpy and reid_ssl.index only).

Run one as ``python -c "import sys; from tests.index.writers import add_rounds; add_rounds(*sys.argv[1:])" FOLDER W``
with the repository on ``PYTHONPATH`` (:data:`WRITER_CODE` is that ``-c`` argument).
"""

from __future__ import annotations

import numpy as np

from reid_ssl.index import GalleryIndex, GalleryItem

WRITER_CODE = "import sys; from tests.index.writers import add_rounds; add_rounds(*sys.argv[1:])"


def add_rounds(folder: str, writer: str, rounds: str = "6") -> None:
    """``rounds`` locked adds of 3 items each (pid = ``writer``) whose vectors point along axis ``writer`` of 8."""
    w = int(writer)
    for r in range(int(rounds)):
        with GalleryIndex.open_for_update(folder) as idx:
            x = np.full((3, 8), 0.01, np.float32)
            x[:, w] = 1.0 + r
            idx.add(x, [GalleryItem(path=f"/w{w}/r{r}/{i}.jpg", pid=w) for i in range(3)])
