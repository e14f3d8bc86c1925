"""Issue 12: the API's input checks without the WebUI — the body reader (size, nesting, NaN), the conditioning
request, and the routes' answers on a bare FastAPI app: 413/422 naming the field with a shortened quote, never
a 500. The real-WebUI run of the same bodies is tests/webui/test_api_validation.py."""

from __future__ import annotations

import json

import pytest

from lib_train.webui.api_input import (MAX_BODY_BYTES, MAX_DEPTH, BadRequest, conditioning_request, json_object,
                                       parse_json_body, short_id)


def _refusal(raw: bytes) -> BadRequest:
    with pytest.raises(BadRequest) as e:
        parse_json_body(raw)
    return e.value


def test_a_body_nested_100000_levels_deep_is_a_422():
    for raw in (b"[" * 100_000 + b"]" * 100_000, b'{"a":' * 100_000 + b"1" + b"}" * 100_000,
                json.dumps({"data": [[[[[[[[[1]]]]]]]]]}).encode()):
        e = _refusal(raw)
        assert e.status == 422 and "nested too deeply" in e.detail[0]["msg"]
    assert parse_json_body(json.dumps({"a": {"b": [[1, 2]]}}).encode()) == {"a": {"b": [[1, 2]]}}
    assert MAX_DEPTH >= 3


def test_a_body_over_the_limit_is_a_413():
    e = _refusal(b" " * (MAX_BODY_BYTES + 1))
    assert e.status == 413 and str(MAX_BODY_BYTES) in e.detail[0]["msg"]


@pytest.mark.parametrize("raw, needle", [(b'{"a": NaN}', "NaN is not a JSON number"),
                                         (b'{"a": -Infinity}', "-Infinity"), (b"{", "not valid JSON"),
                                         (b"\xff\xfe{}", "not UTF-8")])
def test_bad_json_is_named(raw, needle):
    e = _refusal(raw)
    assert e.status == 422 and needle in e.detail[0]["msg"]


def test_an_empty_body_is_none_and_objects_are_required():
    assert parse_json_body(b"") is None
    with pytest.raises(BadRequest, match="must be a JSON object"):
        json_object(["x" * 10_000], "{}")
    with pytest.raises(BadRequest) as e:
        json_object("y" * 20_000_000, "{}")
    assert len(str(e.value)) < 300


@pytest.mark.parametrize("clip_skip", [1000, 0, -3, True, 1.5, "2", None])
def test_clip_skip_is_checked_against_its_setting_range(clip_skip):
    with pytest.raises(BadRequest) as e:
        conditioning_request({"prompts": ["a"], "clip_skip": clip_skip})
    assert [d["loc"] for d in e.value.detail] == [["body", "clip_skip"]]
    assert "from 1 to 12" in e.value.detail[0]["msg"]


def test_the_conditioning_request_names_every_bad_field():
    with pytest.raises(BadRequest) as e:
        conditioning_request({"prompts": ["ok", 3, "x" * 20_000], "sizes": [[10, 10], [64], "a"], "extra": 1})
    locs = [d["loc"] for d in e.value.detail]
    assert ["body", "prompts", 1] in locs and ["body", "prompts", 2] in locs and ["body", "extra"] in locs
    assert ["body", "sizes", 0] in locs and ["body", "sizes", 1] in locs and ["body", "sizes", 2] in locs
    assert all(len(d["msg"]) < 300 for d in e.value.detail)
    for prompts in ([], "a", [""] * 65, None):
        with pytest.raises(BadRequest):
            conditioning_request({"prompts": prompts})
    assert conditioning_request({"prompts": ["a"], "clip_skip": 2}) == {"prompts": ["a"], "clip_skip": 2,
                                                                        "sizes": [(1024, 1024)], "embedding": ""}
    assert conditioning_request({"prompts": ["a"], "embedding": "zqemb"})["embedding"] == "zqemb"
    for bad in (["zqemb"], 3, "e\x00"):
        with pytest.raises(BadRequest) as e:
            conditioning_request({"prompts": ["a"], "embedding": bad})
        assert [d["loc"] for d in e.value.detail] == [["body", "embedding"]]


def test_job_ids_are_quoted_short():
    assert short_id("abc") == "abc" and len(short_id("x" * 5000)) < 30


# ---------------------------------------------------------------------------------------- routes on a bare app

fastapi = pytest.importorskip("fastapi")
testclient = pytest.importorskip("fastapi.testclient")


@pytest.fixture
def client(monkeypatch):
    from lib_train.webui import api

    created = []
    monkeypatch.setattr(api, "_job_response", lambda kwargs: created.append(kwargs) or api.JSONResponse({"ok": 1}))
    monkeypatch.setattr(api, "conditioning_check", lambda *a: {"called": list(a)})
    app = fastapi.FastAPI()
    app.add_api_route("/jobs", api.create_job, methods=["POST"])
    app.add_api_route("/cond", api.conditioning_route, methods=["POST"])
    app.add_api_route("/preprocess", api.preprocess_json, methods=["POST"])
    c = testclient.TestClient(app, raise_server_exceptions=True)
    c.created = created
    return c


def test_the_job_route_refuses_malformed_bodies_before_the_job_manager(client):
    deep = "[" * 100_000 + "]" * 100_000
    for body, status in ((deep, 422), ("[1]", 422), ('"x"', 422), ("{", 422), ('{"a": NaN}', 422),
                         (" " * (MAX_BODY_BYTES + 10), 413), ("null", 422)):
        r = client.post("/jobs", content=body.encode())
        assert r.status_code == status, (body[:20], r.text[:300])
        assert r.json()["detail"][0]["loc"] == ["body"]
        assert len(r.content) < 2000
    assert client.created == []
    assert client.post("/jobs", json={"output": {"name": "n"}}).status_code == 200
    assert client.created == [{"data": {"output": {"name": "n"}}}]


def test_the_conditioning_route_checks_its_fields(client):
    r = client.post("/cond", json={"prompts": ["a"], "clip_skip": 1000})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "clip_skip"]
    r = client.post("/cond", json={"prompts": ["a"], "clip_skip": 2, "sizes": [[512, 768]]})
    assert r.status_code == 200 and r.json() == {"called": [["a"], 2, [[512, 768]], ""]}


def test_the_preprocess_route_wants_an_object(client):
    for body in ('["x"]', "3", "null"):
        r = client.post("/preprocess", content=body.encode())
        assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body"], r.text[:300]
        assert "JSON object" in r.json()["detail"][0]["msg"]
