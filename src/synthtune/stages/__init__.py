"""The stages of the loop, one module each (`preflight`, `generate`, `filter`, `template`, `train`,
`evaluate`, `promote`). Every module fulfils one contract, `Stage`; its settings live below it, in
`synthtune.configs` (the module re-exports its Config class). A stage's private child process
(`_train_child`, `_distilabel_run`) belongs to the stage its `STAGE` names, and no stage module
imports another (tests/test_architecture.py)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from synthtune.configs import PipelineConfig
    from synthtune.store import ArtifactRef, ArtifactStore


class Stage(Protocol):
    """What the runner (synthtune.runner) needs of a stage module."""

    STAGE: str  # the stage's one name: its module, config key, task, artifact folder and test file
    VERSION: str  # bumped when the code changes what the stage writes (it is in every key)

    def key(self, cfg: PipelineConfig, upstream: dict[str, str]) -> str:
        """The cache key of this stage's output: the config that changes it (files by their contents),
        the models it uses, and `upstream`, the content digests of the outputs it reads by input name.
        The same key means the same output."""
        ...

    def run(self, cfg: PipelineConfig, store: ArtifactStore, upstream: dict[str, ArtifactRef],
            output_key: str | None = None, rebuild: bool = False) -> ArtifactRef:
        """The output at `output_key` (computed from `upstream` when not given): reused when it is
        finished and intact (`reused` set on the reference), else built and committed with its manifest
        last. `rebuild` builds it again even when finished (`--refresh`)."""
        ...
