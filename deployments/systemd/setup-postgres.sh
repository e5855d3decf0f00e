#!/bin/sh
# The PostgreSQL role and database of the Prefect server (run once, as root, on the database
# machine; Debian: apt-get install postgresql). The server creates its tables itself.
#
#   sh deployments/systemd/setup-postgres.sh 'a-long-random-password'
#
# It connects as the `postgres` superuser (root runs psql as that user); PGHOST and PGPORT
# choose another server, as for psql. Running it again changes only the password.
#
# Then put the password into PREFECT_API_DATABASE_CONNECTION_URL (prefect-server.env). A
# database on another machine than the server also needs `listen_addresses` in
# postgresql.conf and a `host prefect prefect <server address>/32 scram-sha-256` line in
# pg_hba.conf.
set -eu
password=${1:?usage: setup-postgres.sh PASSWORD}
if [ "$(id -u)" = 0 ]; then as_postgres="runuser -u postgres --"; else as_postgres=""; fi
$as_postgres psql -U postgres -d postgres -v ON_ERROR_STOP=1 -v pw="$password" <<'SQL'
SELECT 'CREATE ROLE prefect LOGIN' WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'prefect')\gexec
ALTER ROLE prefect PASSWORD :'pw';
SELECT 'CREATE DATABASE prefect OWNER prefect' WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = 'prefect')\gexec
SQL
echo "role and database 'prefect' ready"
