-- Keys taken by the latest ReserveKeys of the account. Set in the same UPDATE that takes them, from the row's
-- values before it (SET expressions see the old row in PostgreSQL and SQLite alike), so RETURNING can say how
-- many an `up_to` reservation got without a second statement.
ALTER TABLE accounts ADD COLUMN last_granted BIGINT NOT NULL DEFAULT 0;
