"""The shared-server rule (``--hide-ui-dir-config``): runs read datasets from the upload folder and write to the
method's WebUI folder only."""

from __future__ import annotations

from lib_train.config import default_config
from lib_train.webui.jobs import folder_policy_problems


def _cfg(tmp_path, **paths):
    cfg = default_config(paths.pop("method", "lora"))
    cfg.data.train_dir = str(tmp_path / "uploads" / "run1")
    cfg.output.output_dir = str(tmp_path / "Lora" / "run1")
    for key, value in paths.items():
        section, name = key.split("__")
        setattr(getattr(cfg, section), name, value)
    return cfg


def _check(tmp_path, cfg):
    return {p.where: p.message for p in folder_policy_problems(cfg, data_root=str(tmp_path / "uploads"),
                                                                output_root=str(tmp_path / "Lora"))}


def test_folders_inside_the_roots_pass(tmp_path):
    assert _check(tmp_path, _cfg(tmp_path, network__init_from=str(tmp_path / "Lora" / "old.safetensors"))) == {}


def test_every_folder_outside_is_named(tmp_path):
    cfg = _cfg(tmp_path, data__train_dir="/etc", data__reg_dir=str(tmp_path / "reg"),
               output__output_dir=str(tmp_path / "Lora" / ".." / "elsewhere"),
               network__init_from="/root/secret.safetensors")
    problems = _check(tmp_path, cfg)
    assert set(problems) == {"data.train_dir", "data.reg_dir", "output.output_dir", "network.init_from"}
    assert "--hide-ui-dir-config" in problems["data.train_dir"] and str(tmp_path / "uploads") in problems["data.train_dir"]
    assert str(tmp_path / "Lora") in problems["output.output_dir"]


def test_a_symlink_out_of_the_root_is_caught(tmp_path):
    (tmp_path / "uploads").mkdir()
    (tmp_path / "outside").mkdir()
    (tmp_path / "uploads" / "link").symlink_to(tmp_path / "outside")
    assert set(_check(tmp_path, _cfg(tmp_path, data__train_dir=str(tmp_path / "uploads" / "link")))) == {
        "data.train_dir"}


def test_embedding_template_files_and_init_embeddings(tmp_path):
    cfg = _cfg(tmp_path, method="embedding", embedding__template="/tmp/lines.txt",
               embedding__init_from="/tmp/other.pt")
    assert set(_check(tmp_path, cfg)) == {"embedding.template", "embedding.init_from"}
    cfg.embedding.template = "style"  # a built-in template is not a file
    cfg.embedding.init_from = ""
    assert _check(tmp_path, cfg) == {}
