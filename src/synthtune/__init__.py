"""synthtune: the post-training loop as a pure library (Prefect lives in tasks/ and flows/)."""

__version__ = "0.1.0"

# The order of the loop; one name per stage for its module, config key, task and artifact folder.
STAGES = ("preflight", "generate", "filter", "template", "train", "evaluate", "promote")
