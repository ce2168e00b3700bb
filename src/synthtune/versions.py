"""Library versions that change a stage's outputs, in the keys of the stages they affect.

Upgrading lm-eval, TRL, transformers, PEFT, distilabel or tokenizers can change what a stage
produces, so the stage's key holds the major.minor version of each library it depends on; an
upgrade reruns exactly that stage and everything downstream (patch releases do not).
"""

from __future__ import annotations

STAGE_LIBS = {
    "generate": ("distilabel", "transformers"),
    "template": ("tokenizers", "transformers"),
    "train": ("trl", "peft", "transformers", "bitsandbytes"),
    "evaluate": ("lm_eval", "transformers"),
}


def lib_version(name: str) -> str:
    """major.minor of an installed library ("absent" when it is not installed)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return ".".join(version(name.replace("_", "-")).split(".")[:2])
    except PackageNotFoundError:
        return "absent"


def stage_libs(stage: str) -> dict[str, str]:
    """The versions that enter a stage's key."""
    return {name: lib_version(name) for name in STAGE_LIBS.get(stage, ())}
