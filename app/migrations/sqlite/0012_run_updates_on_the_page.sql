-- PostgreSQL drops the status index of `runs` in this version so that a
-- run's two updates stay on their page (heap-only tuples). SQLite has no such
-- thing (an update rewrites only the index entries of the columns it
-- changes), so it keeps the index for listing by status; the version is kept
-- in step with PostgreSQL's.
SELECT 1;
