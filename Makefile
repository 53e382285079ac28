# Two entry points (see README): `make demo` runs the main job, `make test` runs the tests.
# Both create ./.venv and install the pinned stack into it on first use.
VENV ?= .venv
PY := $(VENV)/bin/python
PYTHON ?= python3
# Offline sites keep prepared tfds data beside the checkout; elsewhere tfds downloads as usual (to ~/tensorflow_datasets).
SHARED_TFDS := $(abspath $(wildcard ../shared/data/tensorflow_datasets))
ifneq ($(SHARED_TFDS),)
export TFDS_DATA_DIR ?= $(SHARED_TFDS)
endif

.PHONY: install demo test test-beam clean

$(VENV)/.installed: setup.py constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e ".[test]"
	touch $@

install: $(VENV)/.installed

demo: install
	$(VENV)/bin/tfr demo $(DEMO_ARGS)

test: install
	$(PY) -m pytest -q -rs $(PYTEST_ARGS) tests

# The Beam pipeline in its own environment: apache-beam needs older protobuf / pyarrow (constraints-beam.txt).
BEAM_VENV ?= .venv-beam
# It gets no pip of its own: the main environment's (upgraded) pip installs into it (`pip --python`).
$(BEAM_VENV)/.installed: setup.py constraints-beam.txt $(VENV)/.installed
	$(PYTHON) -m venv --clear --without-pip $(BEAM_VENV)
	$(PY) -m pip --python $(BEAM_VENV)/bin/python install -q -c constraints-beam.txt -e ".[test,beam]"
	touch $@

test-beam: $(BEAM_VENV)/.installed
	$(BEAM_VENV)/bin/python -m pytest -q -rs $(PYTEST_ARGS) tests/test_pipeline.py

clean:
	rm -rf $(VENV) $(BEAM_VENV) .pytest_cache   # not artifacts/: its runs took hours to train
