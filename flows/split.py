"""Split mode: the data stages on a CPU pool, train and evaluate on a GPU pool.

The parent (`pipeline` with `gpu_deployment=...`) starts the `gpu_stages` flow of that deployment as
a child run and waits; the two only share the artifact root. The child finds its inputs there by
key, and hands its outputs back through it (`handoff/<child run id>.json`): their keys depend on
what the GPU machine resolves (quantization, kernels), which the parent cannot know.
"""

from __future__ import annotations

from prefect.deployments import run_deployment

from synthtune.configs import PipelineConfig
from synthtune.store import ArtifactRef, ArtifactStore


def hand_back(config: PipelineConfig, run_id: str, outputs: dict[str, ArtifactRef]) -> None:
    """The GPU child's outputs, written where its parent reads them."""
    ArtifactStore(config.artifact_root).write_json(("handoff", f"{run_id}.json"),
                                                   {k: v.model_dump(mode="json") for k, v in outputs.items()})


def run_elsewhere(config: PipelineConfig, deployment: str, steps, refs: dict[str, ArtifactRef], gpu_slot: str,
                  fault: str, refresh: list[str]) -> dict[str, ArtifactRef]:
    """Run `steps` as a child flow run of `deployment`, then read their outputs from the artifact root
    (no result travels back through Prefect)."""
    needed = {src for s in steps for src in s.inputs.values() if src in refs}
    child = run_deployment(deployment, timeout=None, parameters={
        "config": config.model_dump(mode="json"),
        "upstream": {name: refs[name].model_dump(mode="json") for name in sorted(needed)},
        "gpu_slot": gpu_slot, "fail_stage": fault, "refresh": list(refresh)})
    if not child.state or not child.state.is_completed():
        state = child.state.name if child.state else "unknown"
        raise RuntimeError(f"GPU stages ({deployment}, run {child.name}) ended {state}: "
                           f"{child.state.message if child.state else ''}")
    store = ArtifactStore(config.artifact_root)
    handed = store.read_json(("handoff", f"{child.id}.json"))
    if handed is None:
        raise RuntimeError(f"GPU stages run {child.name} completed but left no {store.uri('handoff', f'{child.id}.json')}")
    out = {}
    for name, data in handed.items():
        ref = ArtifactRef.model_validate(data)
        if store.ref(ref.stage, ref.key) is None:
            raise RuntimeError(f"GPU stages run {child.name} completed but {name} is not at {ref.uri}")
        out[name] = ref
    return out
