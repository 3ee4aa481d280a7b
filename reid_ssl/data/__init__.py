"""Data: every dataset in one registry (:mod:`~reid_ssl.data.datasets`), Market-style names, re-ID lists,
unlabeled training sources, the two-view augmentation, classification sets, PETS09 and videos."""
