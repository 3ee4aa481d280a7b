"""Self-supervised pretraining: the loop, its state (seeds, resume, checkpoint payload), logs and monitor."""

from reid_ssl.train.loop import Monitor, train

__all__ = ["Monitor", "train"]
