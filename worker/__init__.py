"""Celery workers: model loading, inference, training. Imports ser_shared, never web."""
