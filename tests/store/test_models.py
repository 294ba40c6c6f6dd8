import json
import sys

import pytest

from dormant.store.models import SourceNotFound, materialize


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
