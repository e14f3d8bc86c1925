"""The caption routes of the API (lib_train/webui/api.py, ``/trainer/v1/captions/*``) on a FastAPI app without the
WebUI: a real dataset on disk, the shared WebUI's folder rule by the same function the routes call."""

from __future__ import annotations

import pytest

fastapi = pytest.importorskip("fastapi")
testclient = pytest.importorskip("fastapi.testclient")

from helpers import save_image, write_caption  # noqa: E402


@pytest.fixture
def client(monkeypatch):
    from lib_train.webui import api

    roots: list = [None]
    monkeypatch.setattr(api, "caption_roots", lambda: roots[0])
    app = fastapi.FastAPI()
    app.add_api_route("/captions/tags", api.caption_tags, methods=["GET"])
    for action in ("preview", "apply", "undo"):
        app.add_api_route(f"/captions/{action}", api._caption_post(action), methods=["POST"])
    c = testclient.TestClient(app, raise_server_exceptions=True)
    c.roots = roots
    return c


@pytest.fixture
def dataset(tmp_path):
    train = tmp_path / "uploads" / "run"
    save_image(train / "10_sks" / "a.png", seed=1)
    write_caption(train / "10_sks" / "a.txt", "1girl, sks, blurry")
    save_image(train / "2_b" / "b.png", seed=2)
    write_caption(train / "2_b" / "b.txt", "1girl, café, watermark", "cp1252")
    return train


def test_tags_preview_apply_undo_round_trip(client, dataset):
    before = {p: p.read_bytes() for p in dataset.rglob("*.txt")}
    r = client.get("/captions/tags", params={"train_dir": str(dataset), "legacy_encoding": "true"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["folders"] == ["10_sks", "2_b"] and body["images"] == 2 and body["not_utf8"] == 1
    assert body["tags"][0] == {"tag": "1girl", "count": 2, "folders": {"10_sks": 1, "2_b": 1}}
    plan = {"train_dir": str(dataset), "legacy_encoding": True, "trigger": "sks", "remove": ["blurry", "watermark"]}
    r = client.post("/captions/preview", json=plan)
    assert r.status_code == 200 and r.json()["changed"] == 2 and r.json()["examples"][1]["after"] == "sks, 1girl, café"
    assert {p: p.read_bytes() for p in dataset.rglob("*.txt")} == before  # a preview writes nothing
    r = client.post("/captions/apply", json=plan)
    assert r.status_code == 200 and r.json()["changed"] == 2
    assert (dataset / "2_b" / "b.txt").read_bytes() == "sks, 1girl, café".encode()
    r = client.post("/captions/undo", json={"train_dir": str(dataset)})
    assert r.status_code == 200 and r.json()["restored"] == 2
    assert {p: p.read_bytes() for p in dataset.rglob("*.txt") if ".caption-backups" not in p.parts} == before
    r = client.post("/captions/undo", json={"train_dir": str(dataset)})
    assert r.status_code == 409 and "nothing to undo" in r.json()["detail"]


def test_bad_fields_are_named(client, dataset):
    r = client.post("/captions/preview", json={"train_dir": str(dataset), "mode": "regex", "find": "([", "x": 1})
    assert r.status_code == 422 and [d["loc"] for d in r.json()["detail"]] == [["body", "x"]]
    r = client.post("/captions/preview", json={"train_dir": str(dataset), "mode": "regex", "find": "(["})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "find"]
    r = client.post("/captions/apply", json={"train_dir": str(dataset / "nope"), "trigger": "x"})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["dataset", str(dataset / "nope")]
    r = client.post("/captions/apply", content=b"[1]")
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body"]
    r = client.get("/captions/tags", params={"train_dir": str(dataset), "legacy_encoding": "maybe"})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "legacy_encoding"]
    r = client.post("/captions/preview", json={"train_dir": str(dataset), "trigger": "sks"})  # b.txt is cp1252
    assert r.status_code == 409 and str(dataset / "2_b" / "b.txt") in r.json()["detail"]


def test_a_shared_webui_confines_the_dataset(client, dataset, tmp_path):
    client.roots[0] = [str(tmp_path / "uploads")]
    assert client.get("/captions/tags", params={"train_dir": str(dataset)}).status_code == 200
    other = tmp_path / "elsewhere"
    save_image(other / "1_x" / "a.png")
    for r in (client.get("/captions/tags", params={"train_dir": str(other)}),
              client.post("/captions/apply", json={"train_dir": str(other), "trigger": "x"}),
              client.post("/captions/undo", json={"train_dir": str(other)})):
        assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "train_dir"]
        assert "--hide-ui-dir-config" in r.json()["detail"][0]["msg"]
