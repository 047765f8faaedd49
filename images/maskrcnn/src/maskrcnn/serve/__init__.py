"""The ``serve`` process: ``settings`` (read once at start-up), ``supervisor`` (nginx and gunicorn, signals),
``gunicorn_conf`` and ``wsgi`` (the gunicorn side and its workers), ``app`` (routes), ``codec`` (request and
response bytes) and ``predictor`` (the model). Package data: ``nginx.conf.tmpl``, ``openapi.yaml``.

Imports nothing: the supervisor never imports torch.
"""
