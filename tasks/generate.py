from prefect import get_run_logger
from pydantic import SecretStr

from synthtune.configs import PipelineConfig
from synthtune.stages import generate as stage
from synthtune.store import ArtifactRef, ArtifactStore
from tasks._common import stage_task


def run(cfg: PipelineConfig, store: ArtifactStore, upstream: dict[str, ArtifactRef], **kw) -> ArtifactRef:
    """Synthetic answers from the teacher through distilabel; its log records land in this run's logs."""
    logger = get_run_logger()  # carries the run ids, so records forwarded from another thread still land here

    def forward(record) -> None:
        logger.log(record.levelno, "[%s] %s", record.name, record.getMessage())

    return stage.run(cfg, store, upstream, on_log=forward, api_key=secret_api_key(cfg), **kw)


def secret_api_key(cfg: PipelineConfig) -> SecretStr | None:
    """The teacher's API key from the Prefect Secret block named in the config, if one is."""
    name = cfg.generate.api_key_secret
    if not name or cfg.generate.teacher_kind != "openai":
        return None
    from prefect.blocks.system import Secret

    return SecretStr(Secret.load(name).get())


generate = stage_task(stage, tags=["teacher"], retries=2, call=run)
