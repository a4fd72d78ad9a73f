-- SQLite keys run events by their rowid id already, which is the order live
-- streams read: nothing to change; the version is kept in step with
-- PostgreSQL's.
SELECT 1;
