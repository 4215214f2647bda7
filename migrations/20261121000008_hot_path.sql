-- The commit path and the ledger job write usage events and ledger rows
-- only for tenants, accounts, grants and events the service has just read
-- (ledger rows under the tenant's ledger lock, in the transaction that
-- read them), and nothing ever deletes those parents. The foreign keys of
-- these append-only tables therefore only cost a lookup of each parent per
-- written row, on the hottest writes there are: they go. (Foreign keys of
-- the tables written by admin calls stay.)
DO $$
DECLARE c record;
BEGIN
    FOR c IN
        SELECT conrelid::regclass AS tbl, conname FROM pg_constraint
        WHERE contype = 'f'
          AND ((conrelid = 'usage_events'::regclass AND confrelid = 'tenants'::regclass)
            OR (conrelid = 'ledger'::regclass
                AND confrelid IN ('accounts'::regclass, 'grants'::regclass, 'usage_events'::regclass)))
    LOOP
        EXECUTE format('ALTER TABLE %s DROP CONSTRAINT %I', c.tbl, c.conname);
    END LOOP;
END $$;

-- The ledger job looks for accounts owing an overdraft (rows without a
-- grant) on every pass over a tenant with new usage; without this index it
-- read every ledger row of the tenant to find the few without a grant.
CREATE INDEX ledger_overdrafts ON ledger (tenant_id, account_id) WHERE grant_id IS NULL;
