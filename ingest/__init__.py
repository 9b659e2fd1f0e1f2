"""Bucket events -> Celery tasks. Sends tasks by name: never imports torch or the worker."""
