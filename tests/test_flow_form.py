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


def test_every_list_field_has_a_literal_default_the_form_can_show():
    from prefect.utilities.callables import parameter_schema

    from flows.pipeline import pipeline

    definitions = parameter_schema(pipeline).model_dump_for_openapi()["definitions"]
    lists = [(name, f, p) for name, d in definitions.items() for f, p in d.get("properties", {}).items()
             if "array" in str(p.get("type")) + str(p.get("anyOf"))]
    required = {(name, f) for name, d in definitions.items() for f in d.get("required", [])}
    # a list field either shows its literal default or is required (the deployment's value fills the form)
    assert lists and all("default" in p or (n, f) in required for n, f, p in lists), [
        (n, f) for n, f, p in lists if "default" not in p and (n, f) not in required]
    assert ("EvaluateConfig", "tasks") in required and ("PromoteConfig", "target_task") in required
    params = parameter_schema(pipeline).model_dump_for_openapi()["properties"]
    assert params["fail_stage"]["default"] == "none" and "train" in params["fail_stage"]["enum"]
