# The README's commands. Each installs what it needs first (scripts/setup.sh, idempotent).
.PHONY: demo test bench install unit package
demo:            ## throwaway cluster + narrated demo of the whole token lifecycle
	bash scripts/demo.sh
test:            ## every test on every supported PostgreSQL; `make test PG=17` for one version
	bash scripts/test.sh $(if $(PG),--pg $(PG))
bench:           ## builds a 1M-token database and prints the performance table
	bash bench/run.sh
install:         ## build (release) and install the extension into PostgreSQL 15 (PG=17: into 17)
	bash scripts/setup.sh && bash scripts/install.sh $(PG)
package:         ## .deb and tarball for each supported PostgreSQL into dist/ (PG=17: one)
	bash scripts/setup.sh && bash scripts/package.sh $(PG)
unit:            ## the layout check and the pure core's tests: no pgrx, no Postgres
	python3 scripts/check_layout.py && cargo test -p pg_token_core
