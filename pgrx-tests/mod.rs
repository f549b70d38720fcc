// in-database tests: filled in below
