# Two commands on a fresh machine: `make search` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
ARGS ?=
NPROC ?= 1

.PHONY: setup search study test test-faults bench clean

setup:
	@bash scripts/setup_env.sh

# The main job: TAMT-KD at 70% sparsity on all-MiniLM-L6-v2 and the shipped text sample.
search: setup
	$(VENV)/bin/deepspeed --num_accelerators $(NPROC) --num_nodes 1 launchers/search.py $(ARGS)

# The paper's experiments, small: TAMT-KD, IMP (short), OMP, random at 0.5 / 0.7 / 0.9 on
# all-MiniLM-L6-v2 -> pre-training losses -> supersense_verb + wic_wn (../shared/data), 2 seeds
# -> outputs/study/study.{json,md} + figures (docs/study.md).  Rerun to continue a killed study.
study: setup
	$(PY) launchers/study.py --config studies/embedded.yaml $(ARGS)

test: setup
	$(PY) -m pytest -q tests -m "not faults" $(ARGS)

# Ranks that go wrong at size: 8-rank gloo searches with one rank killed, frozen or on a full
# disk during a checkpoint (issue 15 §4; a few minutes; the full disk mounts a tmpfs: root or
# unprivileged user namespaces).
test-faults: setup
	$(PY) -m pytest -q tests -m faults $(ARGS)

bench: setup
	$(PY) benchmarks/step_overhead.py

clean:
	rm -rf outputs .pytest_cache
