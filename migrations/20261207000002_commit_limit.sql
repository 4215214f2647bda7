-- How far one Commit may go past its hold, and how large one Charge may be
-- (admin.proto CommitLimit). Existing tenants get the defaults.
ALTER TABLE tenants
    ADD COLUMN commit_hold_multiple integer NOT NULL DEFAULT 10
        CHECK (commit_hold_multiple BETWEEN 1 AND 1000000),
    ADD COLUMN commit_allowance numeric(24, 6) NOT NULL DEFAULT 0 CHECK (commit_allowance >= 0),
    ADD COLUMN charge_max numeric(24, 6) CHECK (charge_max > 0);
