"""The flow's parameter form: Prefect builds it from PipelineConfig, descriptions included."""

from __future__ import annotations


def test_parameter_schema_shows_the_whole_config():
    from prefect.utilities.callables import parameter_schema

    from flows.pipeline import pipeline

    schema = parameter_schema(pipeline).model_dump_for_openapi()
    assert schema["required"] == ["config"]
    definitions = schema["definitions"]
    config = definitions["PipelineConfig"]
    assert {"student", "artifact_root", "generate", "filter", "template", "train", "evaluate", "promote"} <= set(
        config["properties"])
    lora = definitions["LoraParams"]["properties"]["r"]
    assert lora["description"] == "LoRA rank." and lora["default"] == 16
