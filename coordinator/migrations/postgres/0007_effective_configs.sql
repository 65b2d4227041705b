-- An agent's effective config files (JSON), apart from its record: the record is rewritten at
-- every change of state, the files only when the agent reports different ones, and the
-- coordinator keeps only their hash in memory (it reads them back for one agent at a time).
-- Records written before this column still carry their files; the next write moves them here.
ALTER TABLE agents ADD COLUMN effective_config TEXT;
