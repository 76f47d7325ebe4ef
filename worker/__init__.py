"""Celery glue: the worker's app and process lifecycle, thin tasks, persisting results, the
reconciling sweeper, retention and webhook delivery. The numeric work is ``ser_ml``; never imports web."""
