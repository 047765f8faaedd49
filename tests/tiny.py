"""The one tiny training job the tests start from: two CPU steps of lite on 128-px images.

Values are strings, as SageMaker writes hyperparameters.json. A test that needs more (steps, hosts, a
validation split) changes single keys where it uses it: ``{**TINY_HP, "max_steps": "4"}``.
num_workers=0: no loader processes (on 2 cores they cost more than they save; the container layer turns
them back on, since shared memory inside a container is what they need).
"""

TINY_HP: dict[str, str] = {
    "arch": "lite",
    "max_steps": "2",
    "batch_size": "2",
    "min_size": "128",
    "max_size": "128",
    "num_workers": "0",
    "log_every": "1",
    "checkpoint_every": "0",
}
