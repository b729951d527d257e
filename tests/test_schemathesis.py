"""Property-based API test: schemathesis generates requests from the server's own
`/openapi.json` (valid and invalid ones) and checks that none makes it answer 500, and that every
answer matches the status codes, content types and schemas the document declares.

Runs in-process (ASGI) against the real service with a random-weight da3-small and an API key,
which every generated request carries (so it reaches validation); schemathesis's own auth
check sends some without it and expects 401, as the document's securitySchemes say.
"""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from schemathesis.config import SchemathesisConfig
from schemathesis.specs.openapi.checks import positive_data_acceptance

from conftest import TEST_API_KEY
from da3_serverless.config import Settings
from da3_serverless.server import create_app
from da3_serverless.service import Service

# Schema-valid is not service-valid: random base64 is no image, a generated URL cannot be
# fetched, a random 3x3 is no camera, a random `outputs` list may ask what da3-small cannot
# give. So "valid data must be accepted" does not hold here; every other check does (the
# document's one-image-source rule, key schemes and status codes included).
EXCLUDED = [positive_data_acceptance]
EXAMPLES = 25  # per operation and mode
# Invalid data must be rejected with a 4xx. 413 counts: the server refuses bodies nested too
# deeply or too rich in JSON structure before parsing them (a generated invalid body can be
# either).
# Either key form of the document's securitySchemes, which schemathesis fills in.
CONFIG = SchemathesisConfig.from_dict(
    {
        "checks": {"negative_data_rejection": {"expected-statuses": [400, 401, 404, 413]}},
        "auth": {
            "openapi": {
                "bearerAuth": {"bearer": TEST_API_KEY},
                "apiKeyHeader": {"api_key": TEST_API_KEY},
            }
        },
    }
)


@pytest.fixture(scope="module")
def app(hf_cache, tmp_path_factory):
    config = Settings(
        model_id="depth-anything/DA3-SMALL", hf_home=hf_cache, hf_hub_offline=True,
        workspace=tmp_path_factory.mktemp("workspace"), device="cpu", api_key=TEST_API_KEY,
        warmup=False, max_process_res=140, download_timeout_s=1.0,
        max_body_bytes=2_000_000,
    )  # fmt: skip
    service = Service(config)
    service.start()
    return create_app(config, service)


@pytest.mark.slow
@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_api_follows_its_own_schema(app, mode):
    schema = schemathesis.openapi.from_asgi("/openapi.json", app, config=CONFIG)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.path for op in operations} >= {"/runsync", "/run", "/status/{job_id}", "/ready"}
    for operation in operations:
        if mode == GenerationMode.NEGATIVE and not len(operation.body):
            continue  # nothing to make invalid (no body; any path string is a valid job id)

        @given(case=operation.as_strategy(generation_mode=mode))
        @settings(max_examples=EXAMPLES, deadline=None, database=None,
                  suppress_health_check=list(HealthCheck))  # fmt: skip
        def check(case) -> None:
            case.call_and_validate(excluded_checks=EXCLUDED)

        check()
