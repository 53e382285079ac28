import pytest

from tf_retrieval.config import ModelConfig


def test_model_config_round_trip_and_id(tmp_path):
    config = ModelConfig(name="finetuned", image_size=160, pooling="gem", head="/x/head.keras", version=3)
    config.save(tmp_path / "model.json")
    loaded = ModelConfig.load(tmp_path / "model.json")
    assert loaded == config
    assert loaded.model_id() == "finetuned:v3:efficientnet_lite0-160px-gem-imagenet:head.keras"
    assert ModelConfig(weights=None).model_id() == "baseline:v1:efficientnet_lite0-96px-avg-random:identity"


def test_model_config_errors(tmp_path):
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['colour'\]"):
        ModelConfig.from_dict({"colour": "red"})
    with pytest.raises(FileNotFoundError, match="config file not found"):
        ModelConfig.load(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="is not valid JSON"):
        ModelConfig.load(tmp_path / "bad.json")
