# dynfarm: `make help` lists the targets.
PYTHON ?= python3
VENV ?= .venv
DEBS := openvpn openssh-server openssh-client iptables iproute2 iputils-ping openssl dash busybox slurm-wlm munge \
	cloud-init
# The programs the unit tests run, all from DEBS.
UNIT_PROGRAMS := openssl openvpn ssh-keygen dash busybox cloud-init
# openvpn is in /usr/sbin, which a user's PATH may lack; the tests find it by PATH.
WITH_SBIN := PATH="$$PATH:/usr/local/sbin:/usr/sbin:/sbin"
PYTEST := $(VENV)/bin/python -m pytest

.DEFAULT_GOAL := help
.PHONY: help deps venv test unit system lint demo bench clean

help:  ## this list
	@grep -E '^[a-z]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-7s %s\n", $$1, $$2}'

deps:  ## install the Debian packages (root; skips what is there), then the venv
	@missing=$$(for p in $(DEBS); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  echo "installing: $$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	fi
	@$(MAKE) --no-print-directory venv

venv:  ## the test venv in .venv: pytest, vermin, ruff (no root; skipped if there)
	@[ -x $(VENV)/bin/pytest ] || { $(PYTHON) -m venv $(VENV) && $(VENV)/bin/pip install -q pytest vermin ruff; }

test: deps lint  ## lint, then every test: unit, then system (root, namespaces, real daemons)
	$(PYTEST) -q tests

unit: venv  ## the unit tests only (no root; needs what `sudo make deps` installs)
	@$(WITH_SBIN); missing=; \
	for p in $(UNIT_PROGRAMS); do command -v $$p >/dev/null || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then echo "make unit: missing program(s):$$missing; run: sudo make deps" >&2; exit 1; fi
	$(WITH_SBIN) $(PYTEST) -q tests -m "not system"

system: deps  ## the system tests only (root)
	$(PYTEST) -q tests -m system

lint: deps  ## Python 3.9 floor (vermin), stdlib-only imports, pyflakes, sh syntax (dash, busybox)
	$(VENV)/bin/vermin -q --no-tips --violations --target=3.9- --eval-annotations dynfarm.py
	$(PYTHON) tests/check_stdlib.py dynfarm.py
	$(VENV)/bin/ruff check -q --select F,E9 dynfarm.py tests bench
	dash -n dynfarm-client.sh
	busybox sh -n dynfarm-client.sh

demo: deps  ## build the namespace world, enroll three VMs, show them, tear down
	$(VENV)/bin/python tests/demo.py

bench: deps  ## benchmarks (print figures; never part of the tests): enrollment, boot storm, parsers, fan-out, links
	$(VENV)/bin/python bench/enroll.py
	$(VENV)/bin/python bench/burst.py
	$(VENV)/bin/python bench/parsers.py
	$(VENV)/bin/python bench/fanout.py
	$(VENV)/bin/python bench/links.py

clean:  ## remove the venv and caches
	rm -rf $(VENV) .pytest_cache tests/__pycache__ __pycache__
