from prefect import get_run_logger, task
from pydantic import SecretStr

from synthtune.artifacts import ArtifactRef
from synthtune.config import PipelineConfig
from synthtune.stages import generate as stage
from tasks._common import cache_key, stage_context


@task(name="generate", cache_key_fn=cache_key(stage), persist_result=True, retries=2, tags=["teacher"])
def generate(cfg: PipelineConfig, upstream: dict[str, ArtifactRef] | None = None) -> ArtifactRef:
    """Synthetic answers from the teacher through distilabel; its log records land in this run's logs."""
    logger = get_run_logger()  # carries the run ids, so records forwarded from another thread still land here

    def forward(record) -> None:
        logger.log(record.levelno, "[%s] %s", record.name, record.getMessage())

    with stage_context(cfg, stage.STAGE) as store:
        return stage.run(cfg, store, on_log=forward, api_key=secret_api_key(cfg))


def secret_api_key(cfg: PipelineConfig) -> SecretStr | None:
    """The teacher's API key from the Prefect Secret block named in the config, if one is."""
    name = cfg.generate.api_key_secret
    if not name or cfg.generate.teacher_kind != "openai":
        return None
    from prefect.blocks.system import Secret

    return SecretStr(Secret.load(name).get())
