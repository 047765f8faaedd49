"""The local harness: SageMaker training jobs, endpoints and batch transform on one machine.

``python -m local --help`` lists the verbs; docs/local.md is the manual. Modules:

* ``layout``: the job tree SageMaker writes (config files, channels) and ``--hp`` parsing;
* ``runtime``: where the image's entrypoints run: plain processes or ``docker run``;
* ``training``: a training job on N emulated hosts, its logs, metrics and failure reason;
* ``artifacts``: ``model.tar.gz`` packing and safe extraction;
* ``endpoint``: a running ``serve`` (start, wait for /ping, stop);
* ``client``: ``/invocations`` requests; ``transform``: batch transform;
* ``progress``: a progress bar on a terminal, log lines elsewhere;
* ``demo``: the main job (synthetic data -> train -> endpoint -> held-out AP);
* ``workflow``: the pipeline's state machine run here (moto's interpreter, adapted by ``sfn``), with real
  training jobs and endpoints behind its SageMaker calls; ``codebuild``: its build branch (the build Lambda
  in-process, the buildspec run on the local Docker engine); ``s3``: folders to and from S3 prefixes;
* ``cli``: the argument parser and the one place errors become exit codes.

Importing it imports nothing heavy (no torch).
"""
