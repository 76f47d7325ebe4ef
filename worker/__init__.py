"""Celery glue: the worker factory (``celery_app.create_worker``) and process lifecycle, thin tasks,
persisting results, the reconciling sweeper, retention and webhook delivery. The numeric work is
``ser_ml``; never imports web. Importing this package builds nothing: no app, no settings."""
