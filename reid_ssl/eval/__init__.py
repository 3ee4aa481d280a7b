"""Evaluation: the one CMC/mAP/mINP evaluator, streaming for huge galleries, re-ranking, feature cache, figures,
the re-ID and classification pipelines, fine-tuning through torchreid, and the baselines."""
