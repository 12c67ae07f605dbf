# Two commands on a fresh machine: `make demo` and `make test`. Both create .venv when it is missing and
# install the pinned torch pair and the requirements once (the stamp file records it), and check Java.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TORCH := torch==2.14.1 torchvision==0.29.1
# pytest-xdist processes for make test (make test TEST_WORKERS=4 on a larger machine)
TEST_WORKERS ?= 2

.PHONY: demo test lint setup java mutate

demo: setup java
	$(BIN)/python demo.py

test: setup java
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS)

lint: setup
	$(BIN)/ruff check .

# Mutation testing of one module against its own tests, not part of CI (docs/development.md):
# make mutate MODULE=models/losses.py [MUTATE_CHILDREN=1]; needs pip install 'mutmut==3.*'
MUTATE_CHILDREN ?= 1
mutate:
	MUTATE_CHILDREN=$(MUTATE_CHILDREN) scripts/mutate.sh $(MODULE)

setup: $(STAMP)

# Reinstalls only when a requirements file changed since the last installation.
$(STAMP): requirements.txt requirements-dev.txt requirements-app.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install $(PIP_FLAGS) $(TORCH)
	$(BIN)/python -m pip install $(PIP_FLAGS) -r requirements-dev.txt
	touch $@

java:
	@command -v java >/dev/null 2>&1 || { \
	  echo "Java is missing (the METEOR and PTB-tokenizer metrics run on it). Install it, then run make again:"; \
	  echo "  sudo apt-get install -y default-jre-headless    # Debian / Ubuntu"; \
	  echo "  brew install openjdk                            # macOS"; \
	  exit 1; }
