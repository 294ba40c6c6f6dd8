import json
import sys

import pytest

from dormant.store.models import ModelSource, SourceNotFound, materialize


@pytest.mark.timeout(300)
def test_builtin_import_is_complete_and_reused(model_dir, capsys):
    config = json.loads((model_dir / "config.json").read_text())
    assert "quantization_config" not in config
    assert (model_dir / "model.safetensors").is_file()
    assert (model_dir / "tokenizer.json").is_file()
    mtime = (model_dir / "model.safetensors").stat().st_mtime_ns
    assert materialize("builtin:smollm2") == model_dir
    assert (model_dir / "model.safetensors").stat().st_mtime_ns == mtime
    assert "importing" not in capsys.readouterr().err


@pytest.mark.timeout(30)
def test_store_does_not_import_torch():
    import subprocess

    code = "import sys, dormant.store.models; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.timeout(60)
def test_local_folder_and_errors(model_dir, tmp_path):
    assert materialize(str(model_dir)) == model_dir.resolve()
    with pytest.raises(SourceNotFound, match="config.json"):
        materialize(str(tmp_path))
    with pytest.raises(SourceNotFound, match="nope.gguf"):
        materialize(str(tmp_path / "nope.gguf"))


@pytest.mark.timeout(60)
def test_hf_repo_offline_names_the_source(store_home, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    with pytest.raises(SourceNotFound, match="someorg/somemodel"):
        materialize("someorg/somemodel")


@pytest.mark.timeout(30)
def test_one_function_decides_each_source_s_folder(tmp_path):
    from dormant.store.models import parse_source

    folder = tmp_path / "here"
    folder.mkdir()
    models = tmp_path / "store" / "models"
    assert parse_source("builtin:smollm2", tmp_path / "store").folder == models / "SmolLM2-135M-Instruct"
    assert parse_source("~/w/x.gguf", tmp_path / "store").folder == models / "x"
    assert parse_source(" mine ", tmp_path / "store") == ModelSource("mine", "imported", models / "mine")
    assert parse_source(str(folder), tmp_path / "store").kind == "folder"
    assert parse_source("org/name@v1", tmp_path / "store") == ModelSource("org/name@v1", "hf", None)
    for bad, reason in (("/no/such/dir", "no such folder"), ("builtin:other", "builtin"), ("a b/c", "HF repo")):
        with pytest.raises(SourceNotFound, match=reason):
            parse_source(bad, tmp_path / "store")


@pytest.mark.timeout(60)
def test_materialize_and_local_folder_land_where_parse_source_says(model_dir, store_home, tmp_path):
    from dormant.store.models import check_source, local_folder, parse_source

    assert parse_source("builtin:smollm2").folder == model_dir == local_folder("smollm2")
    assert check_source("builtin:smollm2", store_home).folder == model_dir
    assert local_folder(str(tmp_path)) is None  # no config.json
    assert local_folder("no such thing/x y") is None
    with pytest.raises(SourceNotFound, match="did you mean 'smollm2'"):
        check_source("smolm2")
