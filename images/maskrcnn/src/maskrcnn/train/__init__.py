"""The ``train`` process: ``config`` (what the job is told), ``data``, ``synthetic``, ``engine``
(train_one_epoch / evaluate), ``checkpoint``, ``distributed``, ``budget``, ``summaries``, ``metrics`` (the
metrics log line and SageMaker's regexes) and ``job`` (the whole job, top to bottom).

Imports nothing: ``maskrcnn.train.config`` and ``maskrcnn.train.metrics`` are read without torch.
"""
