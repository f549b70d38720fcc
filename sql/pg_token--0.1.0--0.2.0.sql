-- pg_token 0.1.0 -> 0.2.0. Run by ALTER EXTENSION pg_token UPDATE (TO '0.2.0').
--
-- 0.2.0 is not released yet: until it is, every schema change lands here, in the same commit
-- as its code and tests, and tests/e2e/test_upgrade.py proves that a database upgraded from
-- 0.1.0 has exactly the catalog of a fresh 0.2.0 install. Once 0.2.0 is released this file is
-- frozen like sql/pg_token--0.1.0.sql.
\echo Use "ALTER EXTENSION pg_token UPDATE" to load this file. \quit
