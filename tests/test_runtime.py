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


def test_one_blas_thread_limits_blas_until_the_last_block_leaves():
    import threading

    import numpy as np  # loads the BLAS that the limit applies to
    from threadpoolctl import threadpool_info

    def blas_threads():
        return {lib["num_threads"] for lib in threadpool_info() if lib["user_api"] == "blas"}

    before = blas_threads()
    assert before  # numpy's BLAS is seen
    inside, leave = threading.Event(), threading.Event()

    def other_block():
        with runtime.one_blas_thread():
            inside.set()
            leave.wait(10)

    other = threading.Thread(target=other_block)
    other.start()
    assert inside.wait(10)
    assert blas_threads() == {1}
    with runtime.one_blas_thread():
        with runtime.one_blas_thread():  # nested
            assert blas_threads() == {1}
            np.testing.assert_array_equal(np.ones((2, 3), np.float32) @ np.ones((3, 2), np.float32), np.full((2, 2), 3))
    assert blas_threads() == {1}  # the other thread's block is still inside
    leave.set()
    other.join(10)
    assert blas_threads() == before
