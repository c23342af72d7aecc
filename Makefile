# The two commands of the README:
#   make run    set up .venv, initialise the local-development instance, run it
#   make test   set up .venv with the test extras, run the whole test suite
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
DEV_CONFIG := etc/mailstack.dev.toml
STAMP := $(VENV)/.installed

.PHONY: run test test-deps bench clean

$(STAMP): setup.py setup.cfg
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV) || { \
	  echo "python3-venv is missing; installing it (needs root)"; \
	  apt-get update -qq && apt-get install -y -qq python3-venv && $(PYTHON) -m venv $(VENV); }
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test]' --config-settings editable_mode=compat
	@touch $@

run: $(STAMP)
	$(BIN)/mailstack init --config $(DEV_CONFIG) --user demo@example.test
	exec $(BIN)/twistd --nodaemon --pidfile= mailstack --config $(DEV_CONFIG)

# External clients the interop tests drive (tests/test_pop3_interop.py,
# tests/test_imap_interop.py); installed only when missing, so a second run does nothing.
test-deps:
	@command -v fetchmail >/dev/null && command -v curl >/dev/null && \
	  command -v mbsync >/dev/null && command -v mutt >/dev/null || { \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
	    fetchmail curl isync mutt >/dev/null; }

test: $(STAMP) test-deps
	$(BIN)/trial tests

clean:
	rm -rf $(VENV) var _trial_temp build *.egg-info
