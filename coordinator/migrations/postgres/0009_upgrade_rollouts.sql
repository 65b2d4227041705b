-- Upgrades are rollouts of a package version and refer to no config version.
ALTER TABLE rollouts ALTER COLUMN config_id DROP NOT NULL;
