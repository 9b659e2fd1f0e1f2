"""The GPU worker: Celery app, micro-batcher and the fetch -> decode -> infer -> sink pipeline."""
