from synthtune.stages import evaluate as stage
from tasks._common import stage_task

# lm-eval on the base student (no upstream train) or on the adapter of upstream['train']
evaluate = stage_task(stage, tags=["gpu"], retries=1)
