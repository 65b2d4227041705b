-- An agent's own-metrics window (its one-minute points, JSON), apart from its record: many
-- agents are read at once by their record (fleet views, groups), one at a time with the window.
ALTER TABLE agents ADD COLUMN throughput TEXT;
