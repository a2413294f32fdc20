"""The user's settings: config.toml, validated; its `[kd]` table is the engine's KDConfig."""
