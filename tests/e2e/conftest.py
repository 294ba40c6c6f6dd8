"""Fixtures for end-to-end tests (helpers live in e2e_harness.py)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

import pytest
import yaml


@pytest.fixture(scope="session")
def home(store_home: Path, model_dir: Path) -> Path:
    """The session's DORMANT_HOME with SmolLM2 already imported (once, by tests/conftest.py)."""
    return store_home


@pytest.fixture(scope="module")
def module_workdir(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Path:
    return tmp_path_factory.mktemp(request.module.__name__.rsplit(".", 1)[-1])


# ---- the OpenAI spec, parsed once per session ------------------------------------------------


def _spec_path() -> Path:
    env = os.environ.get("DORMANT_OPENAPI_SPEC")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "../shared/openai/openapi.yaml"


def _nullable_to_json_schema(node: Any) -> Any:
    """OpenAI's 3.1 document still says `nullable: true` in places; JSON Schema spells it as a type."""
    if isinstance(node, list):
        return [_nullable_to_json_schema(n) for n in node]
    if not isinstance(node, dict):
        return node
    node = {k: _nullable_to_json_schema(v) for k, v in node.items()}
    if node.pop("nullable", False) is True:
        if isinstance(node.get("type"), str):
            node["type"] = [node["type"], "null"]
            if "enum" in node:
                node["enum"] = [*node["enum"], None]
        else:
            node = {"anyOf": [node, {"type": "null"}]}
    return node


@pytest.fixture(scope="session")
def openapi_schemas() -> Callable[[str], Any] | str:
    """schema(name) -> a jsonschema validator for components/schemas/<name>, the spec parsed
    once; where the spec file is absent, a str that says where it was looked for."""
    path = _spec_path()
    if not path.is_file():
        return f"OpenAI spec not found at {path} (set DORMANT_OPENAPI_SPEC)"
    import jsonschema
    from referencing import Registry, Resource
    from referencing.jsonschema import DRAFT202012

    doc = _nullable_to_json_schema(yaml.load(path.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader)))
    registry = Registry().with_resource("urn:openai", Resource.from_contents(doc, default_specification=DRAFT202012))
    validators: dict[str, Any] = {}

    def schema(name: str) -> Any:
        if name not in validators:
            validators[name] = jsonschema.Draft202012Validator(
                {"$ref": f"urn:openai#/components/schemas/{name}"}, registry=registry)
        return validators[name]

    return schema


@pytest.fixture
def openapi_validate(openapi_schemas: Callable[[str], Any] | str, subtests: Any) -> Callable[[str, Any], None]:
    """validate(schema_name, instance), as a subtest of the calling test: a mismatch fails the
    test; without the spec file the check is reported skipped, with the reason, and the test's
    own asserts still run."""

    def validate(name: str, instance: Any) -> None:
        with subtests.test(msg=f"OpenAI schema {name}"):
            if isinstance(openapi_schemas, str):
                pytest.skip(f"{openapi_schemas}: {name} not checked against it")
            openapi_schemas(name).validate(instance)

    return validate
