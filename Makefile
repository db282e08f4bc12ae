# Two commands on a fresh machine: `make search` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
ARGS ?=
NPROC ?= 1

.PHONY: setup search study test test-faults test-cluster bench clean

setup:
	@bash scripts/setup_env.sh

# The main job: TAMT-KD at 70% sparsity on all-MiniLM-L6-v2 and the shipped text sample.
search: setup
	$(VENV)/bin/deepspeed --num_accelerators $(NPROC) --num_nodes 1 launchers/search.py $(ARGS)

# The paper's experiments, small: TAMT-KD, IMP (short), OMP, random at 0.5 / 0.7 on
# all-MiniLM-L6-v2 -> pre-training losses -> supersense_verb (../shared/data) + supersense_noun
# (tamt_ds/data/tasks), 2 seeds
# -> outputs/study/study.{json,md} + figures (docs/study.md).  Rerun to continue a killed study.
study: setup
	$(PY) launchers/study.py --config studies/embedded.yaml $(ARGS)

test: setup
	$(PY) -m pytest -q tests $(ARGS)

# Ranks that go wrong at size: 8-rank gloo searches with one rank killed, frozen or on a full
# disk during a checkpoint (issue 15 §4; a few minutes; the full disk mounts a tmpfs: root or
# unprivileged user namespaces).
test-faults: setup
	$(PY) -m pytest -q tests -m faults $(ARGS)

# launchers/slurm's jobs on a real one-node SLURM cluster on this machine (root: installs
# slurm-wlm and munge with apt-get if missing).  A cluster this target started, it stops
# again, whatever the tests say; one that was already up it leaves up.
test-cluster: setup
	@if bash scripts/slurm_cluster.sh status >/dev/null 2>&1; then started=; else started=1; fi; \
	  [ -z "$$started" ] || trap 'bash scripts/slurm_cluster.sh down' EXIT; \
	  bash scripts/slurm_cluster.sh up && $(PY) -m pytest -q -m cluster tests $(ARGS)

bench: setup
	$(PY) benchmarks/step_overhead.py

clean:
	rm -rf outputs .pytest_cache
