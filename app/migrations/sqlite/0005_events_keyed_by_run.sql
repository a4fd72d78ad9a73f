-- PostgreSQL keys run events by (run_id, id) from this version. SQLite keeps
-- its rowid key (free) and its (run_id, id) index: nothing to change, the
-- version is kept in step with PostgreSQL's.
SELECT 1;
