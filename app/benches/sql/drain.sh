#!/bin/sh
# What each part of a one-step run's record costs a drain, measured with
# pgbench on hand-written copies of the store's statements (no application):
#   drain.sh URL [BATCH] [CLIENTS]
# URL names a database migrated by `vm-webapp migrate` (its runs and jobs are
# replaced). Prints jobs/s for each variant; docs/benchmarks.md has the
# figures measured on the project's machine.
set -eu
url=$1
batch=${2:-100}
clients=${3:-6}
here=$(dirname "$0")
per_client=$((60000 / batch / clients))
for variant in everything without_usage without_usage_or_events packed_events_no_ledger; do
    psql -q "$url" -f "$here/preload.sql" >/dev/null
    tps=$(pgbench -n -c "$clients" -j 2 -t "$per_client" -D batch="$batch" \
        -f "$here/drain_$variant.sql" "$url" | sed -n 's/^tps = \([0-9.]*\).*/\1/p')
    echo "$variant: batch $batch x $clients clients: $(awk "BEGIN { printf \"%d\", $tps * $batch }") jobs/s"
done
