"""`.runpod/hub.json` and `.runpod/tests.json` against RunPod Hub's documented format (publishing
guide: hub.json / tests.json reference), and against the code: every environment variable they
name is one the service reads, every default parses, every test request is a valid v1 request.
"""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import pytest
from jsonschema import Draft202012Validator
from PIL import Image

from da3_serverless.api.schema import parse_request
from da3_serverless.config import DEFAULT_MODEL_ID, Settings, SettingsError, load_settings
from da3_serverless.inference.catalog import lookup_model, valid_model_ids
from da3_serverless.runpod_worker import worker_settings

HUB_DIR = Path(__file__).resolve().parents[1] / ".runpod"

_INPUT = {
    "type": "object",
    "required": ["name", "type", "description"],
    "additionalProperties": False,
    "properties": {
        "name": {"type": "string", "minLength": 1},
        "type": {"enum": ["string", "number", "boolean", "huggingface"]},
        "description": {"type": "string", "minLength": 1},
        "default": {"type": ["string", "number", "boolean"]},
        "advanced": {"type": "boolean"},
        "options": {
            "type": "array",
            "minItems": 1,
            "items": {
                "type": "object",
                "required": ["label", "value"],
                "additionalProperties": False,
                "properties": {"label": {"type": "string"}, "value": {"type": "string"}},
            },
        },
        "min": {"type": "number"},
        "max": {"type": "number"},
        "trueValue": {"type": "string"},
        "falseValue": {"type": "string"},
    },
}
_CUDA_VERSIONS = {"type": "array", "items": {"type": "string", "pattern": r"^\d+\.\d+$"}}

HUB_SCHEMA = {
    "type": "object",
    "required": ["title", "description", "type", "category", "config"],
    "additionalProperties": False,
    "properties": {
        "title": {"type": "string", "minLength": 1},
        "description": {"type": "string", "minLength": 1},
        "type": {"const": "serverless"},
        "category": {"enum": ["audio", "embedding", "language", "video", "image"]},
        "iconUrl": {"type": "string", "pattern": "^https://"},
        "config": {
            "type": "object",
            "required": ["runsOn", "containerDiskInGb", "gpuCount", "gpuIds"],
            "additionalProperties": False,
            "properties": {
                "runsOn": {"const": "GPU"},
                "containerDiskInGb": {"type": "integer", "minimum": 1},
                "gpuCount": {"type": "integer", "minimum": 1},
                "gpuIds": {"type": "string", "minLength": 1},
                "allowedCudaVersions": _CUDA_VERSIONS,
                "presets": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "required": ["name", "defaults"],
                        "additionalProperties": False,
                        "properties": {
                            "name": {"type": "string"},
                            "defaults": {"type": "object"},
                        },
                    },
                },
                "env": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "required": ["key"],
                        "additionalProperties": False,
                        "properties": {
                            "key": {"type": "string", "pattern": "^[A-Z][A-Z0-9_]*$"},
                            "value": {"type": "string"},
                            "input": _INPUT,
                        },
                        "oneOf": [{"required": ["value"]}, {"required": ["input"]}],
                    },
                },
            },
        },
    },
}

TESTS_SCHEMA = {
    "type": "object",
    "required": ["tests", "config"],
    "additionalProperties": False,
    "properties": {
        "tests": {
            "type": "array",
            "minItems": 1,
            "items": {
                "type": "object",
                "required": ["name", "input"],
                "additionalProperties": False,
                "properties": {
                    "name": {"type": "string", "minLength": 1},
                    "input": {"type": "object"},
                    "timeout": {"type": "integer", "minimum": 1000},  # milliseconds
                },
            },
        },
        "config": {
            "type": "object",
            "required": ["gpuTypeId", "gpuCount"],
            "additionalProperties": False,
            "properties": {
                "gpuTypeId": {"type": "string", "minLength": 1},
                "gpuCount": {"type": "integer", "minimum": 1},
                "env": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "required": ["key", "value"],
                        "additionalProperties": False,
                        "properties": {"key": {"type": "string"}, "value": {"type": "string"}},
                    },
                },
                "allowedCudaVersions": _CUDA_VERSIONS,
            },
        },
    },
}


def load(name: str) -> dict:
    return json.loads((HUB_DIR / name).read_text())


def settings_aliases() -> set[str]:
    """Every environment variable Settings reads (its fields' validation aliases)."""
    names: set[str] = set()
    for field in Settings.model_fields.values():
        alias = field.validation_alias
        choices = getattr(alias, "choices", [alias])
        names.update(str(choice) for choice in choices if choice is not None)
    return names


def assert_read_by_the_code(key: str) -> None:
    # HF_* variables are read by huggingface_hub itself (HF_HOME, HF_TOKEN, HF_HUB_OFFLINE, ...).
    assert key in settings_aliases() or key.startswith("HF_"), (
        f"{key} is not read by the service: add it to Settings in config.py or drop it"
    )


def hub_env_defaults(hub: dict) -> dict[str, str]:
    """The environment a deployment with every default gets, as RunPod would set it."""
    env: dict[str, str] = {}
    for item in hub["config"]["env"]:
        if "value" in item:
            env[item["key"]] = item["value"]
            continue
        spec = item["input"]
        default = spec.get("default")
        if spec["type"] == "boolean":
            env[item["key"]] = spec["trueValue"] if default else spec["falseValue"]
        elif default is not None:
            env[item["key"]] = str(default)
    return env


@pytest.mark.parametrize(
    ("name", "schema"), [("hub.json", HUB_SCHEMA), ("tests.json", TESTS_SCHEMA)]
)
def test_files_follow_the_documented_format(name: str, schema: dict) -> None:
    Draft202012Validator.check_schema(schema)
    errors = sorted(Draft202012Validator(schema).iter_errors(load(name)), key=str)
    assert not errors, "\n".join(f"{list(e.absolute_path)}: {e.message}" for e in errors)


def test_schemas_reject_what_the_hub_would() -> None:
    hub = load("hub.json")
    hub["category"] = "depth"
    hub["config"]["env"].append({"key": "X", "input": {"name": "x", "type": "string"}})
    messages = [e.message for e in Draft202012Validator(HUB_SCHEMA).iter_errors(hub)]
    assert any("'depth' is not one of" in m for m in messages)
    assert any("'description' is a required property" in m for m in messages)


def test_hub_env_is_what_the_service_reads() -> None:
    hub = load("hub.json")
    keys = [item["key"] for item in hub["config"]["env"]]
    assert len(keys) == len(set(keys))
    assert set(keys) >= {
        "DA3_API_KEY",
        "MODEL_ID",
        "OUTPUT_RETENTION_DAYS",
        "BUCKET_ENDPOINT_URL",
        "BUCKET_ACCESS_KEY_ID",
        "BUCKET_SECRET_ACCESS_KEY",
    }
    for key in keys:
        assert_read_by_the_code(key)
    for preset in hub["config"]["presets"]:
        assert set(preset["defaults"]) <= set(keys), preset["name"]


def test_hub_defaults_parse_and_match_the_code() -> None:
    hub = load("hub.json")
    env = hub_env_defaults(hub)
    settings = Settings(**env)  # aliases as keys, exactly as from the environment
    assert settings.model_id == DEFAULT_MODEL_ID
    assert settings.output_retention_days == Settings.model_fields["output_retention_days"].default
    assert settings.allow_unauthenticated is False  # safe by default
    assert not settings.api_key

    model = next(item["input"] for item in hub["config"]["env"] if item["key"] == "MODEL_ID")
    assert [option["value"] for option in model["options"]] == valid_model_ids()
    for option in model["options"]:
        assert lookup_model(option["value"]).license in option["label"]
    for preset in hub["config"]["presets"]:
        assert lookup_model(preset["defaults"]["MODEL_ID"]) is not None


def test_hub_tests_are_valid_requests_for_their_config() -> None:
    spec = load("tests.json")
    env = {item["key"]: item["value"] for item in spec["config"]["env"]}
    for key in env:
        assert_read_by_the_code(key)
    settings = Settings(**env)
    assert settings.allow_unauthenticated or settings.api_key, "the Hub's requests carry no key"

    for case in spec["tests"]:
        request = parse_request(case["input"], settings)
        model = lookup_model(request.model_id or settings.model_id)
        assert model is not None, case["name"]
        if request.output_metric:
            assert model.metric or (model.needs_focal and request.focal_length_px), case["name"]
        image = Image.open(io.BytesIO(base64.b64decode(request.image_base64, validate=True)))
        assert image.format == "PNG"
        assert image.size[0] <= 128 and image.size[1] <= 128  # a small, quick request


def test_hub_tests_run_on_a_gpu_the_listing_allows() -> None:
    hub, spec = load("hub.json"), load("tests.json")
    assert spec["config"]["gpuCount"] == hub["config"]["gpuCount"]
    assert set(spec["config"]["allowedCudaVersions"]) <= set(hub["config"]["allowedCudaVersions"])
    # torch 2.10.0's CUDA 12.8 wheels need a driver for CUDA 12.8 or newer.
    for version in hub["config"]["allowedCudaVersions"]:
        assert tuple(map(int, version.split("."))) >= (12, 8), version


def test_every_hub_setting_range_is_what_the_worker_accepts() -> None:
    """A form value the worker refuses at start would crash-loop it: each number's min and max
    parse and a step past either is refused; each option and boolean parses."""
    hub = load("hub.json")
    for item in hub["config"]["env"]:
        key, field = item["key"], item["input"]
        if field["type"] == "number":
            low, high = field["min"], field["max"]
            for value in (low, high, field["default"]):
                load_settings(**{key: str(value)})
            for value in (low - 1e-6, high + 1e-6):
                with pytest.raises(SettingsError, match=key):
                    load_settings(**{key: str(value)})
        elif field["type"] == "boolean":
            assert load_settings(**{key: field["trueValue"]}) != load_settings(
                **{key: field["falseValue"]}
            )
        for option in field.get("options", []):
            load_settings(**{key: option["value"]})


def test_the_worker_serves_without_its_own_key_behind_runpods() -> None:
    """The Hub form's defaults (no DA3_API_KEY): the worker relies on RunPod's API key; a key
    set in the form is required of every request."""
    defaults = Settings(**hub_env_defaults(load("hub.json")))
    assert worker_settings(defaults).allow_unauthenticated
    keyed = worker_settings(Settings(**{**hub_env_defaults(load("hub.json")), "DA3_API_KEY": "k"}))
    assert not keyed.allow_unauthenticated and keyed.api_key == "k"
