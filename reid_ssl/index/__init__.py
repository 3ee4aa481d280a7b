"""The persistent FAISS gallery index (see :mod:`reid_ssl.index.gallery`)."""

from reid_ssl.index.gallery import *  # noqa: F403  (temporary while the package is split)
