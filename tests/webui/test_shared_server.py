"""A shared WebUI (``--hide-ui-dir-config``): runs may only read the upload folder and write the WebUI's own folders.

Skipped unless the session's server runs with that flag, e.g.
``SD_WEBUI_ARGS="--ckpt models/Stable-diffusion/random-sd15.safetensors --hide-ui-dir-config"``.
"""

from __future__ import annotations

import pytest


@pytest.fixture
def shared(webui):
    if not webui.get("/sdapi/v1/cmd-flags").get("hide_ui_dir_config"):
        pytest.skip("the WebUI of this session does not run with --hide-ui-dir-config")
    return webui


def test_folders_outside_the_webuis_are_refused_by_name(shared, lora_config, tmp_path):
    body = lora_config("shared_x", 2, output={"output_dir": str(tmp_path / "out")})  # dataset in a temp folder
    r = shared.request("POST", "/trainer/v1/jobs", body=body)
    assert r.status == 422, r.body
    problems = {tuple(d["loc"]): d["msg"] for d in r.body["detail"]}
    assert set(problems) == {("body", "data", "train_dir"), ("body", "output", "output_dir")}
    assert all("--hide-ui-dir-config" in m for m in problems.values())
    assert all(j["name"] != "shared_x" for j in shared.get("/trainer/v1/jobs"))  # nothing was queued


def test_preprocessing_is_kept_to_the_upload_folder(shared, tmp_path):
    r = shared.request("POST", "/trainer/v1/preprocess", body={"source_dir": str(tmp_path), "width": 64,
                                                                "height": 64})
    assert r.status == 422 and "--hide-ui-dir-config" in str(r.body), r.body
