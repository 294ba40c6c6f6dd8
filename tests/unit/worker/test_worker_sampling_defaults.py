"""A request's missing temperature / top_p come from the model's generation_config.json."""

from __future__ import annotations

import json

import pytest

from dormant.worker.serving import sampling_defaults


@pytest.mark.timeout(60)
def test_the_embedded_model_samples_as_its_model_card_says(model_dir):
    assert sampling_defaults(model_dir) == {"temperature": 0.2, "top_p": 0.9}


@pytest.mark.timeout(10)
@pytest.mark.parametrize("config, expected", [
    ({"temperature": 0.6, "top_p": 0.95, "do_sample": True}, {"temperature": 0.6, "top_p": 0.95}),
    ({"temperature": 0.7}, {"temperature": 0.7}),
    ({"temperature": 0.7, "do_sample": False}, {}),  # greedy model: keep the API's defaults
    (None, {}),
])
def test_generation_config_is_read_when_present(tmp_path, config, expected):
    if config is not None:
        (tmp_path / "generation_config.json").write_text(json.dumps(config))
    assert sampling_defaults(tmp_path) == expected
