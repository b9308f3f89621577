"""Schema-driven fuzzing of every route of a real server: hypothesis strategies are derived from the served
OpenAPI document (valid-looking bodies from the schemas, bounds ignored half the time, plus arbitrary JSON
and bytes), sent with the admin token to a private home. No request may get a 5xx."""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import quote

import httpx
import pytest
from conftest import Server
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from service_fixtures import AUTH, admin_server  # noqa: F401

EXAMPLES = 25
JSON_LEAF = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20)
ANY_JSON = st.recursive(
    JSON_LEAF, lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c, max_size=4), max_leaves=12
)


@pytest.fixture(scope="module")
def openapi(admin_server: Server) -> dict:
    return httpx.get(f"{admin_server.url}/openapi.json").json()


class Schemas:
    """JSON schema → hypothesis strategy, for the subset FastAPI emits."""

    def __init__(self, doc: dict, strict: bool) -> None:
        self.doc = doc
        self.strict = strict

    def resolve(self, schema: dict) -> dict:
        while "$ref" in schema:
            name = schema["$ref"].rsplit("/", 1)[-1]
            schema = self.doc["components"]["schemas"][name]
        return schema

    def of(self, schema: dict, depth: int = 0) -> st.SearchStrategy[Any]:
        schema = self.resolve(schema)
        if depth > 4:
            return JSON_LEAF
        for key in ("anyOf", "oneOf", "allOf"):
            if key in schema:
                return st.one_of([self.of(s, depth + 1) for s in schema[key]])
        if "const" in schema:
            return st.just(schema["const"])
        if "enum" in schema:
            return st.sampled_from(schema["enum"])
        kind = schema.get("type")
        s = self.strict
        if kind == "object":
            props = schema.get("properties", {})
            required = set(schema.get("required", []))
            optional = {k: self.of(v, depth + 1) for k, v in props.items() if k not in required}
            return st.fixed_dictionaries(
                {k: self.of(v, depth + 1) for k, v in props.items() if k in required}, optional=optional
            ) | (st.just({}) if not s else st.nothing())
        if kind == "array":
            lo, hi = (schema.get("minItems", 0), min(schema.get("maxItems", 6), 6)) if s else (0, 6)
            return st.lists(self.of(schema.get("items", {}), depth + 1), min_size=lo, max_size=max(lo, hi))
        if kind == "integer":
            if s:
                return st.integers(schema.get("minimum"), schema.get("maximum"))
            return st.integers() | st.sampled_from([0, -1, 2**31, 2**63, 10**30])
        if kind == "number":
            return st.floats(schema.get("minimum"), schema.get("maximum"), allow_nan=False) if s else st.floats()
        if kind == "boolean":
            return st.booleans()
        if kind == "null":
            return st.none()
        if kind == "string":
            if s and "pattern" in schema:
                return st.from_regex(schema["pattern"], fullmatch=True)
            lo, hi = (schema.get("minLength", 0), schema.get("maxLength", 40)) if s else (0, 80)
            return st.text(min_size=lo, max_size=min(hi, 80))
        return ANY_JSON


def _operations(doc: dict) -> list[tuple[str, str, dict]]:
    return [(m.upper(), p, op) for p, ops in doc["paths"].items() for m, op in ops.items()]


def _path_strategy(path: str, op: dict, schemas: Schemas) -> st.SearchStrategy[str]:
    params = {p["name"]: p for p in op.get("parameters", []) if p["in"] == "path"}
    if not params:
        return st.just(path)
    known = st.sampled_from(["dense", "cnn-s50", "cnn-m20", "ghost"])
    values = {
        name: (known | schemas.of(p["schema"]) | st.text(max_size=12)).map(lambda v: quote(str(v), safe=""))
        for name, p in params.items()
    }

    def fill(d: dict) -> str:
        out = path
        for k, v in d.items():
            out = out.replace("{" + k + "}", v or "_")
        return out

    return st.fixed_dictionaries(values).map(fill)


def _body_strategy(op: dict, schemas: Schemas) -> st.SearchStrategy[dict]:
    content = op.get("requestBody", {}).get("content", {})
    if "application/json" in content:
        schema = content["application/json"]["schema"]
        return (schemas.of(schema) | ANY_JSON).map(lambda b: {"content": json.dumps(b).encode()})
    if "multipart/form-data" in content:
        schema = schemas.resolve(content["multipart/form-data"]["schema"])
        fields = list(schema.get("properties", {}))
        return st.dictionaries(st.sampled_from(fields), st.binary(max_size=256), max_size=len(fields)).map(
            lambda files: {"files": {k: (k, v) for k, v in files.items()}} if files else {}
        )
    return st.just({})


def test_every_route_is_covered(openapi: dict) -> None:
    ops = {(m, p) for m, p, _ in _operations(openapi)}
    assert ("POST", "/v1/query") in ops and ("POST", "/v1/admin/models") in ops
    assert ("PUT", "/v1/admin/cascade") in ops and ("DELETE", "/v1/admin/models/{name}/versions/{version}") in ops


@pytest.mark.parametrize("strict", [True, False], ids=["schema", "loose"])
def test_fuzz_every_route_no_5xx(admin_server: Server, openapi: dict, strict: bool) -> None:
    schemas = Schemas(openapi, strict)
    operations = _operations(openapi)
    requests = st.sampled_from(operations).flatmap(
        lambda o: st.tuples(st.just(o[0]), _path_strategy(o[1], o[2], schemas), _body_strategy(o[2], schemas))
    )
    seen: set[tuple[str, str]] = set()

    @settings(
        max_examples=EXAMPLES * len(operations) // 2,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.data_too_large],
    )
    @given(requests)
    def run(req: tuple[str, str, dict]) -> None:
        method, path, kw = req
        headers = {**AUTH}
        if "content" in kw:
            headers["content-type"] = "application/json"
        r = httpx.request(method, f"{admin_server.url}{path}", headers=headers, timeout=60, **kw)
        seen.add((method, path.split("/")[2] if path.count("/") > 1 else path))
        assert r.status_code < 500, f"{method} {path} {kw!r:.300} -> {r.status_code} {r.text[:300]}"

    run()
    assert len(seen) >= 5
    assert httpx.get(f"{admin_server.url}/readyz").status_code == 200
