-- When each stored rating was given (UserRatedVideo.rating_timestamp, ms since the epoch; 0: unknown), so a late,
-- older event never overwrites a newer rating.
ALTER TABLE sv_ratings ADD COLUMN rated_ms BIGINT NOT NULL DEFAULT 0;
