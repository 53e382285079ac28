import os

from tf_retrieval import runtime


def test_quiet_tensorflow_hides_error_logs_only_without_an_nvidia_driver(monkeypatch):
    for driver, level in ((False, "3"), (True, "2")):
        monkeypatch.delenv("TF_CPP_MIN_LOG_LEVEL", raising=False)
        monkeypatch.setattr(runtime, "has_nvidia_driver", lambda: driver)
        runtime.quiet_tensorflow()
        assert os.environ["TF_CPP_MIN_LOG_LEVEL"] == level
    monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", "0")  # the user's choice wins
    runtime.quiet_tensorflow()
    assert os.environ["TF_CPP_MIN_LOG_LEVEL"] == "0"
