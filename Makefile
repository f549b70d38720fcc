# The README's commands. Each installs what it needs first (scripts/setup.sh, idempotent).
.PHONY: demo test bench install unit
demo:            ## throwaway cluster + narrated demo of the whole token lifecycle
	bash scripts/demo.sh
test:            ## every test: unit, cargo pgrx test, end-to-end clients, isolation, standby
	bash scripts/test.sh
bench:           ## builds a 1M-token database and prints the performance table
	bash bench/run.sh
install:         ## build (release) and install the extension
	bash scripts/setup.sh && bash scripts/install.sh
unit:            ## the layout check and the pure core's tests: no pgrx, no Postgres
	python3 scripts/check_layout.py && cargo test -p pg_token_core
