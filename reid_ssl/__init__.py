"""reid_ssl: self-supervised person re-identification with the truncated triplet loss.

- [0] G. Wang et al., "Solving Inefficiency of Self-supervised Representation Learning", ICCV 2021,
  https://arxiv.org/abs/2104.08760
"""

__version__ = "0.1.0"
