from synthtune.stages import preflight as stage
from tasks._common import stage_task

# models load without remote code, chat template present, eval tasks exist, disk is free
preflight = stage_task(stage, tags=["cpu"])
